"""Hardware comparison: one model and workload on several accelerators, with plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perfmodel.costmodel.execution import DEFAULT_EXEC
from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.parallel import Parallelism
from perfmodel.planning.deploy import Deployment, evaluate, max_batch
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec

BATCHES = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512])


def compare(model: ModelSpec, hws: list[HardwareSpec], inp: int, out: int, batch: int, precision: Precision,
            out_dir: Path, exec_mode: str = DEFAULT_EXEC) -> dict:
    rows, curves = [], {}
    for hw in hws:
        # the smallest tensor-parallel group on which the batch fits (one device when it can)
        for tp in (1, 2, 4, 8):
            if tp > model.num_heads or (model.num_kv_heads % tp and tp % model.num_kv_heads):
                continue
            if tp > 1 and hw.interconnect is None:
                break
            dep = Deployment(model, hw, Parallelism(tp=tp), precision, exec_mode=exec_mode)
            fit = max_batch(dep, inp + out)
            if fit >= batch:
                break
        bs = BATCHES[BATCHES <= max(fit, 1)] if fit else BATCHES[:1]
        e = evaluate(dep, bs, inp, out)
        curves[f"{hw.name}" + (f" ×{dep.parallelism.tp}" if dep.parallelism.tp > 1 else "")] = (bs, e, fit)
        one = evaluate(dep, np.array([batch]), inp, out)
        peak = float(np.max(e["output_tokens_per_s"])) if fit else 0.0
        price = hw.price_per_hour_usd
        gpus = dep.parallelism.tp
        rows.append({"hardware": hw.name, "gpus": gpus, "fits": bool(fit >= batch), "ttft_s": float(one["ttft_s"][0]),
                     "tpot_s": float(one["tpot_s"][0]), "tokens_per_s": float(one["output_tokens_per_s"][0]),
                     "max_batch": fit, "peak_tokens_per_s": peak,
                     "headroom_bytes": float(one["usable_bytes"] - np.asarray(one["total_bytes"]).reshape(-1)[0]),
                     "price_per_hour_usd": price,
                     "cost_per_million_tokens_usd": gpus * price / (peak * 3600) * 1e6 if price and peak else None})
    plots = _plots(model, curves, rows, out_dir)
    return {"model": model.name, "input": inp, "output": out, "batch": batch, "exec_mode": exec_mode, "rows": rows,
            "plots": plots}


def _plots(model, curves, rows, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perfmodel.output import atomic_write

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, (bs, e, fit) in curves.items():
        axes[0].plot(bs, np.asarray(e["tpot_s"]) * 1e3, marker="o", label=name)
        axes[1].plot(np.asarray(e["tpot_s"]) * 1e3, e["output_tokens_per_s"], marker="o", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="TPOT (ms)", title="decode latency vs batch")
    axes[1].set(xscale="log", yscale="log", xlabel="TPOT (ms): latency per token",
                ylabel="output tokens/s per replica", title="throughput vs latency (up to the batch that fits)")
    priced = [r for r in rows if r["cost_per_million_tokens_usd"]]
    axes[2].barh([r["hardware"] for r in priced], [r["cost_per_million_tokens_usd"] for r in priced],
                 color="tab:green")
    axes[2].set(xlabel="$ per million output tokens (at the largest batch that fits)", title="cost per token")
    for ax in axes[:2]:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{model.name} across accelerators")
    path = Path(out_dir) / "compare.png"
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    paths.append(str(path))
    return paths
