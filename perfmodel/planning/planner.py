"""`perfmodel plan`: the cheapest deployment that meets TTFT and TPOT SLOs at a request rate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.execution import DEFAULT_EXEC
from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.parallel import Parallelism
from perfmodel.errors import PerfmodelError
from perfmodel.planning.deploy import Deployment, binding_constraint, evaluate, max_batch
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: float = 90.0


@dataclass(frozen=True)
class PlanInput:
    input_tokens: np.ndarray  # sampled request lengths (a fixed length is one value)
    output_tokens: np.ndarray
    rate: float | None  # requests per second; None: report one replica at full load


def _candidates(model: ModelSpec, max_tp: int, max_pp: int):
    for tp in (1, 2, 4, 8, 16):
        if tp > max_tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
            continue
        for pp in (1, 2, 4, 8):
            if pp <= max_pp and pp <= model.num_layers:
                yield Parallelism(tp=tp, pp=pp)


def plan(model: ModelSpec, hw: HardwareSpec, work: PlanInput, slo: SLO, precision: Precision | None = None,
         max_tp: int = 8, max_pp: int = 4, max_batch_limit: int = 1024, exec_mode: str = DEFAULT_EXEC) -> dict:
    p = precision or Precision()
    q = slo.percentile
    i_mean, o_mean = int(np.mean(work.input_tokens)), int(np.mean(work.output_tokens))
    i_p, o_p = int(np.percentile(work.input_tokens, q)), int(np.percentile(work.output_tokens, q))
    options, rejected = [], []
    for par in _candidates(model, max_tp, max_pp):
        if par.tp * par.pp > 1 and hw.interconnect is None:
            continue
        dep = Deployment(model, hw, par, p, exec_mode=exec_mode)
        fit = max_batch(dep, i_p + o_p, max_batch_limit)
        if fit == 0:
            rejected.append(f"tp={par.tp} pp={par.pp}: weights do not fit")
            continue
        b = np.arange(1, fit + 1)
        tail = evaluate(dep, b, i_p, o_p)  # the SLO is judged on the percentile request
        ok = (tail["ttft_s"] <= slo.ttft_s) & (tail["tpot_s"] <= slo.tpot_s)
        if not ok.any():
            worst = "TTFT" if tail["ttft_s"][0] > slo.ttft_s else "TPOT"
            rejected.append(f"tp={par.tp} pp={par.pp}: {worst} SLO missed even at batch 1 "
                            f"(TTFT {tail['ttft_s'][0]:.3g} s, TPOT {tail['tpot_s'][0]:.3g} s)")
            continue
        best_b = int(b[ok].max())
        # an unconstrained SLO would allow: the largest batch meeting it if memory were unlimited
        slo_b = best_b if best_b < fit else _slo_batch_unbounded(dep, i_p, o_p, slo, max_batch_limit)
        mean = evaluate(dep, np.array([best_b]), i_mean, o_mean)
        row = _pick(mean, 0, 1)
        tail_row = _pick(tail, best_b - 1, fit)
        per_replica_tok = float(row["output_tokens_per_s"])
        per_replica_req = float(row["requests_per_s"])
        replicas = math.ceil(work.rate / per_replica_req) if work.rate else 1
        gpus = replicas * par.tp * par.pp
        price = hw.price_per_hour_usd
        served_tok = (work.rate * o_mean) if work.rate else per_replica_tok
        cost = gpus * price / (served_tok * 3600) * 1e6 if price else None
        options.append({
            "tp": par.tp, "pp": par.pp, "batch": best_b, "max_batch_fits": fit, "replicas": replicas, "gpus": gpus,
            "ttft_s": float(tail_row["ttft_s"]), "tpot_s": float(tail_row["tpot_s"]),
            "per_gpu_output_tokens_per_s": per_replica_tok / (par.tp * par.pp),
            "replica_output_tokens_per_s": per_replica_tok, "cost_per_million_output_tokens_usd": cost,
            "memory_per_gpu_bytes": float(tail_row["total_bytes"]),
            "binding": binding_constraint(tail_row, fit, slo_b)})
    if not options:
        return {"feasible": False, "reason": "; ".join(rejected) or "no candidate configuration", "options": []}
    options.sort(key=lambda o: (o["gpus"], o["cost_per_million_output_tokens_usd"] or 0, -o["batch"]))
    best = options[0]
    band = {}
    for which in ("optimistic", "pessimistic"):
        alt = _replan_one(model, hw.with_efficiency(which), work, slo, p, best, max_batch_limit, exec_mode)
        band[which] = alt
    return {"feasible": True, "model": model.name, "hardware": hw.name, "best": best, "band": band,
            "options": options, "rejected": rejected,
            "workload": {"input_mean": i_mean, "output_mean": o_mean, f"input_p{q:g}": i_p, f"output_p{q:g}": o_p,
                         "rate": work.rate}, "slo": dataclasses.asdict(slo)}


def _pick(d: dict, i: int, n: int) -> dict:
    """Entry i of every (possibly scalar) array in d, as a plain value."""
    return {k: np.broadcast_to(v, (n,))[i].item() if isinstance(v, (np.ndarray, np.generic)) else v
            for k, v in d.items()}


def _slo_batch_unbounded(dep, i_p, o_p, slo, limit):
    b = np.arange(1, limit + 1)
    t = evaluate(dep, b, i_p, o_p)
    ok = (t["ttft_s"] <= slo.ttft_s) & (t["tpot_s"] <= slo.tpot_s)
    return int(b[ok].max()) if ok.any() else 0


def _replan_one(model, hw, work, slo, p, best, limit, exec_mode=DEFAULT_EXEC) -> dict:
    """The chosen parallelism under other efficiency factors: its batch, throughput and GPU count."""
    sub = plan_fixed(model, hw, work, slo, p, Parallelism(best["tp"], best["pp"]), limit, exec_mode)
    return {k: sub.get(k) for k in ("batch", "gpus", "replicas", "tpot_s", "ttft_s", "per_gpu_output_tokens_per_s",
                                    "cost_per_million_output_tokens_usd")}


def plan_fixed(model, hw, work, slo, p, par, limit=1024, exec_mode=DEFAULT_EXEC) -> dict:
    dep = Deployment(model, hw, par, p, exec_mode=exec_mode)
    q = slo.percentile
    i_mean, o_mean = int(np.mean(work.input_tokens)), int(np.mean(work.output_tokens))
    i_p, o_p = int(np.percentile(work.input_tokens, q)), int(np.percentile(work.output_tokens, q))
    fit = max_batch(dep, i_p + o_p, limit)
    if not fit:
        return {}
    b = np.arange(1, fit + 1)
    tail = evaluate(dep, b, i_p, o_p)
    ok = (tail["ttft_s"] <= slo.ttft_s) & (tail["tpot_s"] <= slo.tpot_s)
    if not ok.any():
        return {"batch": 0}
    bb = int(b[ok].max())
    mean = evaluate(dep, np.array([bb]), i_mean, o_mean)
    req = float(mean["requests_per_s"][0])
    tok = float(mean["output_tokens_per_s"][0])
    replicas = math.ceil(work.rate / req) if work.rate else 1
    gpus = replicas * par.tp * par.pp
    served = work.rate * o_mean if work.rate else tok
    return {"batch": bb, "gpus": gpus, "replicas": replicas, "tpot_s": float(tail["tpot_s"][bb - 1]),
            "ttft_s": float(tail["ttft_s"][bb - 1]), "per_gpu_output_tokens_per_s": tok / (par.tp * par.pp),
            "cost_per_million_output_tokens_usd": gpus * hw.price_per_hour_usd / (served * 3600) * 1e6
            if hw.price_per_hour_usd else None}


def check_slo(slo: SLO) -> SLO:
    if slo.ttft_s <= 0 or slo.tpot_s <= 0:
        raise PerfmodelError("--ttft/--tpot: SLOs must be positive seconds")
    if not 0 < slo.percentile <= 100:
        raise PerfmodelError(f"--percentile: {slo.percentile} is not valid; allowed: 0 < p <= 100")
    return slo
