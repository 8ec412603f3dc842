"""Report figures, each a function of an Analysis (and friends) returning a matplotlib Figure."""

from __future__ import annotations

import numpy as np

from perfmodel.costmodel.operators import kv_cache_bytes
from perfmodel.costmodel.request import Workload, analyze


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roofline(a, title: str):
    """Every prefill and decode operator at its arithmetic intensity and attained FLOP/s, under the roofs."""
    plt = _plt()
    hw = a.hardware
    fig, ax = plt.subplots(figsize=(10, 6.5))
    bw = hw.memory_bandwidth
    ai = np.geomspace(1e-2, 1e5, 300)
    for name, peak in sorted(hw.peak_tflops.items(), key=lambda kv: -kv[1]):
        lw = 2.2 if name == a.precision.compute_dtype else 0.9
        ax.plot(ai, np.minimum(peak * 1e12, ai * bw) / 1e12, lw=lw, label=f"{name} roof: {peak:g} TFLOP/s")
        ax.annotate(f"ridge {peak * 1e12 / bw:.0f}", (peak * 1e12 / bw, peak), fontsize=7, alpha=0.7)
    ax.plot(ai, np.minimum(hw.vector_tflops * 1e12, ai * bw) / 1e12, "k:", lw=1, label="vector (elementwise)")
    ax.plot(ai, ai * bw / 1e12, color="grey", lw=0.6, ls="--", label=f"memory roof: {hw.memory_bandwidth_gbps:g} GB/s")
    top = hw.peak_tflops.get(a.precision.compute_dtype, max(hw.peak_tflops.values())) * 1e12
    for level, ls in zip(hw.memory_levels, ("-.", ":", (0, (3, 1, 1, 1)))):
        # an operator whose working set fits this level reads at its bandwidth (the cache-aware roofline)
        ax.plot(ai, np.minimum(top, ai * level.bandwidth) / 1e12, color="tab:green", lw=0.8, ls=ls,
                label=f"{level.name} roof: {level.bandwidth / 1e9:.4g} GB/s (≤ {level.capacity_bytes / 2**20:.3g} MiB)")
    for phase, marker, color in (("prefill", "o", "tab:blue"), ("decode", "s", "tab:orange")):
        rows = [r for r in a.op_rows() if r["phase"] == phase and r["flops"] > 0]
        x = np.array([r["arithmetic_intensity"] for r in rows])
        y = np.array([r["flops"] / r["time_s"] / 1e12 for r in rows])
        ax.scatter(x, y, marker=marker, s=36, color=color, edgecolor="k", linewidth=0.4, label=f"{phase} operators",
                   zorder=3)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["op"], (xi, yi), fontsize=6.5, xytext=(3, 3), textcoords="offset points", alpha=0.8)
    ridge = max(hw.peak_tflops.values()) * 1e12 / bw
    top_ai = max([r["arithmetic_intensity"] for r in a.op_rows()] + [ridge])
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="attained TFLOP/s",
           title=title, xlim=(1e-2, top_ai * 5))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def memory(a):
    """Memory breakdown at this workload, and KV-cache growth with context for several batch sizes."""
    plt = _plt()
    m, w, hw, p = a.model, a.workload, a.hardware, a.precision
    mem = a.memory
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    parts = [("weights", mem["weights_bytes"], "tab:blue"), ("KV cache", mem["kv_cache_bytes"], "tab:orange"),
             ("activations", mem["activation_bytes"], "tab:green")]
    left = 0.0
    for name, v, c in parts:
        axes[0].barh([0], [v / 1e9], left=left, color=c, label=f"{name}: {v / 1e9:.2f} GB")
        left += v / 1e9
    axes[0].axvline(hw.memory_capacity_gb, color="red", ls="--", label=f"capacity {hw.memory_capacity_gb:g} GB")
    axes[0].set(yticks=[], xlabel="GB", title=f"memory at batch {w.batch}, {w.input_tokens}+{w.output_tokens} tokens")
    axes[0].legend(fontsize=8)
    ctx = np.linspace(1, max(m.max_position, w.input_tokens + w.output_tokens), 200)
    for b in sorted({1, 8, 32, w.batch}):
        axes[1].plot(ctx, (mem["weights_bytes"] + kv_cache_bytes(m, ctx, b, p.kv_cache)) / 1e9, label=f"batch {b}")
    axes[1].axhline(hw.memory_capacity_gb, color="red", ls="--", label="capacity")
    axes[1].axhline(mem["weights_bytes"] / 1e9, color="grey", ls=":", label="weights")
    axes[1].set(xlabel="context (tokens per sequence)", ylabel="weights + KV cache (GB)",
                title=f"KV cache growth: {mem['kv_bytes_per_token'] / 1024:.0f} KiB per token")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    return fig


def latency(a):
    """TTFT, TPOT and throughput against batch and against sequence length."""
    plt = _plt()
    m, hw, w, p = a.model, a.hardware, a.workload, a.precision
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    res = [analyze(m, hw, Workload(b, w.input_tokens, w.output_tokens), p, a.flash, exec_mode=a.exec_mode).request
           for b in batches]
    lens = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    lens = [n for n in lens if n <= m.max_position]
    res_len = [analyze(m, hw, Workload(w.batch, n, min(w.output_tokens, 64)), p, a.flash,
                       exec_mode=a.exec_mode).request for n in lens]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    axes[0].plot(batches, [r["ttft_s"] * 1e3 for r in res], marker="o", label="TTFT")
    axes[0].plot(batches, [r["tpot_s"] * 1e3 for r in res], marker="s", label="TPOT (mean)")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms", title="latency vs batch")
    axes[1].plot(batches, [r["tokens_per_s"] for r in res], marker="o", color="tab:purple")
    axes[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="output tokens/s", title="throughput vs batch")
    axes[2].plot(lens, [r["ttft_s"] * 1e3 for r in res_len], marker="o", label="TTFT")
    axes[2].plot(lens, [r["tpot_last_s"] * 1e3 for r in res_len], marker="s", label="TPOT")
    axes[2].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms",
                title=f"latency vs sequence length (batch {w.batch})")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{m.name} on {hw.name}")
    return fig
