"""One deployment (model, hardware, parallelism, precision) at a batch size: per-device memory, step times,
throughput and the binding constraint. Vectorised over batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.execution import DEFAULT_EXEC
from perfmodel.costmodel.operators import Precision, kv_cache_bytes, phase_ops, weight_memory_bytes
from perfmodel.costmodel.parallel import Parallelism, comm_seconds, split_ops
from perfmodel.costmodel.roofline import op_timings, phase_summary
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec

RESERVE = 0.10  # of device memory kept free (allocator fragmentation, CUDA context, workspace)


@dataclass(frozen=True)
class Deployment:
    model: ModelSpec
    hardware: HardwareSpec
    parallelism: Parallelism = Parallelism()
    precision: Precision = Precision()
    flash: bool = True
    exec_mode: str = DEFAULT_EXEC


def _phase(dep: Deployment, batch, new, past, phase):
    ops = split_ops(phase_ops(dep.model, batch, new, past, dep.precision, dep.flash, phase=phase,
                              exec_mode=dep.exec_mode), dep.parallelism, dep.model)
    s = phase_summary(op_timings(ops, dep.hardware, dep.precision, dep.exec_mode))
    comm = comm_seconds(dep.model, dep.parallelism, dep.hardware, np.asarray(batch) * np.asarray(new), dep.precision)
    comm_s = sum(comm.values())
    return s, comm_s


def memory_per_device(dep: Deployment, batch, tokens) -> dict:
    """Weights and KV cache split over tp*pp devices, plus the largest activation working set."""
    m, par, p = dep.model, dep.parallelism, dep.precision
    shards = par.tp * par.pp
    weights = weight_memory_bytes(m, p) / shards
    if m.is_moe and par.ep > par.tp:  # experts spread wider than the tensor-parallel group
        expert_share = m.moe_layers * m.num_experts * m.mlp_params(m.moe_intermediate_size)
        from perfmodel.dtypes import bytes_per_element
        weights -= expert_share * bytes_per_element(p.expert_dtype(m)) / shards * (1 - par.tp / par.ep)
    kv = kv_cache_bytes(m, tokens, batch, p.kv_cache) / shards
    # activations: the MLP's intermediate for one prefill chunk of up to 2048 tokens, split by tp
    act = np.minimum(np.asarray(tokens), 2048) * max(m.intermediate_size, m.hidden_size) * 3 * p.act_bytes / par.tp
    total = weights + kv + act
    usable = dep.hardware.memory_capacity * (1 - RESERVE)
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "activation_bytes": act, "total_bytes": total,
            "usable_bytes": usable, "fits": total <= usable}


def max_batch(dep: Deployment, tokens_per_seq: int, limit: int = 4096) -> int:
    """Largest batch whose per-device memory fits (0 when even the weights do not)."""
    b = np.arange(1, limit + 1)
    fits = memory_per_device(dep, b, tokens_per_seq)["fits"]
    return int(b[fits].max()) if fits.any() else 0


def evaluate(dep: Deployment, batch, input_tokens: int, output_tokens: int) -> dict:
    """Serving figures per replica at each batch size (arrays over batch).

    TTFT is one request's prefill (continuous batching admits it at once); TPOT is the decode step of the full
    batch at the mean context; a replica finishes batch requests per (batch prefills + output decode steps).
    With pipeline parallelism, pp micro-batches of `batch` sequences are in flight, one per stage.
    """
    b = np.asarray(batch, dtype=np.float64)
    par = dep.parallelism
    pre1, pre1_comm = _phase(dep, 1, input_tokens, 0, "prefill")
    host = dep.hardware.host_overhead_us * 1e-6  # the serving loop's time per step outside the forward
    ttft = float(pre1["time_s"] + pre1_comm) + host
    mean_past = input_tokens + max(output_tokens - 1, 0) / 2
    dec, dec_comm = _phase(dep, b, 1, mean_past, "decode")
    tpot = dec["time_s"] + dec_comm + host
    end, end_comm = _phase(dep, b, 1, input_tokens + output_tokens - 1, "decode")
    tpot_end = end["time_s"] + end_comm + host
    steps = max(output_tokens - 1, 0)
    round_s = b * ttft + steps * tpot  # one batch of requests, start to finish
    in_flight = b * par.pp
    req_per_s = in_flight / round_s
    mem = memory_per_device(dep, in_flight / par.pp if par.pp > 1 else b, input_tokens + output_tokens)
    comm_share = dec_comm / np.maximum(tpot, 1e-30)
    return {"batch": b, "ttft_s": np.full_like(b, ttft), "tpot_s": tpot, "tpot_end_s": tpot_end,
            "requests_per_s": req_per_s, "output_tokens_per_s": req_per_s * output_tokens,
            "decode_bound": dec["bound"], "prefill_bound": pre1["bound"], "comm_share": comm_share, **mem}


def binding_constraint(row: dict, max_fit: int, slo_batch: int) -> str:
    """One sentence: what stops this deployment from doing more."""
    if row.get("comm_share", 0) > 0.3:
        return (f"interconnect: {row['comm_share'] * 100:.0f} % of each decode step is tensor-parallel "
                "all-reduce over the link")
    if max_fit and max_fit <= slo_batch:
        return (f"memory capacity: at most {max_fit} sequences' KV cache fit beside the weights, below the "
                f"{slo_batch} the latency SLO would allow")
    if str(row.get("decode_bound")) == "compute":
        return "compute: decode steps at this batch are compute-bound; the TPOT SLO caps the batch"
    return ("memory bandwidth: each decode step streams the weights and KV cache; the TPOT SLO caps the batch "
            "before memory runs out")
