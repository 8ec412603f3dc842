"""Validation figures: predicted vs measured, error by operator, and measured operators on the roofline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perfmodel.output import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    _plt().close(fig)
    return path


def scatter(op_rows: list[dict], phase_rows: list[dict], path: Path, title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, rows, what in ((axes[0], phase_rows, "phase (forward pass)"), (axes[1], op_rows, "operator")):
        for phase, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
            rs = [r for r in rows if r["phase"] == phase and r["measured_s"] > 0]
            ax.scatter([r["measured_s"] * 1e3 for r in rs], [r["predicted_s"] * 1e3 for r in rs], s=14,
                       alpha=0.7, color=color, label=phase)
        vals = [r[k] * 1e3 for r in rows for k in ("measured_s", "predicted_s") if r[k] > 0]
        lo, hi = min(vals) / 1.5, max(vals) * 1.5
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
        ax.fill_between([lo, hi], [lo / 1.1, hi / 1.1], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15,
                        label="±10 %")
        ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)",
               title=f"per {what}", xlim=(lo, hi), ylim=(lo, hi))
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    return _save(fig, path)


def error_by_operator(summary: list[dict], path: Path, title: str) -> Path:
    plt = _plt()
    summary = sorted(summary, key=lambda r: r["median_ape_pct"])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(summary) + 1.5))
    y = np.arange(len(summary))
    ax.barh(y, [r["median_ape_pct"] for r in summary], color="tab:blue", label="median")
    ax.scatter([r["p90_ape_pct"] for r in summary], y, color="tab:red", marker="|", s=120, label="p90")
    ax.set_yticks(y, [r["op"] for r in summary])
    ax.axvline(10, color="grey", ls="--", lw=1)
    ax.set(xlabel="|predicted − measured| / measured (%)", title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def roofline(hw, op_rows: list[dict], path: Path, title: str, dtype: str = "fp32") -> Path:
    """Operators at their arithmetic intensity: measured achieved FLOP/s beside the predicted point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 6))
    bw = hw.memory_bandwidth
    ai = np.geomspace(1e-2, 1e4, 200)
    for name, peak in sorted(hw.peak_tflops.items(), key=lambda kv: -kv[1]):
        ax.plot(ai, np.minimum(peak * 1e12, ai * bw) / 1e9, lw=1.5 if name == dtype else 0.8,
                label=f"{name} roof {peak:g} TFLOP/s")
    ax.plot(ai, np.minimum(hw.vector_tflops * 1e12, ai * bw) / 1e9, "k:", lw=1, label="vector (elementwise)")
    top = hw.peak_tflops.get(dtype, max(hw.peak_tflops.values())) * 1e12
    for level, ls in zip(hw.memory_levels, ("-.", "--", (0, (3, 1, 1, 1)))):
        # the cache-aware roofline: a working set that fits this level reads at its bandwidth
        ax.plot(ai, np.minimum(top, ai * level.bandwidth) / 1e9, color="tab:green", lw=0.8, ls=ls,
                label=f"{level.name} roof {level.bandwidth / 1e9:.4g} GB/s (≤ {level.capacity_bytes / 2**20:.3g} MiB)")
    ax.plot(ai, ai * bw / 1e9, color="grey", lw=0.6, ls="--", label=f"DRAM roof {bw / 1e9:g} GB/s")
    rows = [r for r in op_rows if r["flops"] > 0 and r["measured_s"] > 0]
    for phase, marker in (("prefill", "o"), ("decode", "s")):
        rs = [r for r in rows if r["phase"] == phase]
        x = [r["flops"] / r["bytes"] for r in rs]
        ax.scatter(x, [r["flops"] / r["measured_s"] / 1e9 for r in rs], marker=marker, s=16, color="tab:red",
                   alpha=0.6, label=f"{phase} measured")
        ax.scatter(x, [r["flops"] / r["predicted_s"] / 1e9 for r in rs], marker=marker, s=16, facecolor="none",
                   edgecolor="tab:blue", alpha=0.6, label=f"{phase} predicted")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="GFLOP/s", title=title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
