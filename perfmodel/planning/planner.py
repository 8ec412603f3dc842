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
from perfmodel.planning.saturation import saturation, utilisation
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
        if tp > max_tp or tp > model.num_heads or (model.num_kv_heads % tp and tp % model.num_kv_heads):
            continue
        for pp in (1, 2, 4, 8):
            if pp <= max_pp and pp <= model.num_layers:
                yield Parallelism(tp=tp, pp=pp)


def plan(model: ModelSpec, hw: HardwareSpec, work: PlanInput, slo: SLO, precision: Precision | None = None,
         max_tp: int = 8, max_pp: int = 4, max_batch_limit: int = 1024, exec_mode: str = DEFAULT_EXEC,
         spare: int = 0) -> dict:
    """spare: replicas kept beyond what the rate needs, so the SLO still holds with `spare` of them down (the
    load spread over replicas - spare): N+1 planning is spare=1."""
    if not 0 <= spare <= 64:
        raise PerfmodelError(f"--spare: must be an integer in [0, 64], got {spare}")
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
        lo = loaded(dep, b, i_p, o_p, i_mean, o_mean, work.rate, spare)  # the SLO: the percentile request, loaded
        tail = lo["tail"]
        ok = (lo["ttft_s"] <= slo.ttft_s) & (lo["tpot_s"] <= slo.tpot_s)
        if not ok.any():
            worst = "TTFT" if lo["ttft_s"][0] > slo.ttft_s else "TPOT"
            rejected.append(f"tp={par.tp} pp={par.pp}: {worst} SLO missed even at batch 1 "
                            f"(TTFT {lo['ttft_s'][0]:.3g} s, TPOT {lo['tpot_s'][0]:.3g} s)")
            continue
        best_b = int(b[ok].max())
        # an unconstrained SLO would allow: the largest batch meeting it if memory were unlimited
        slo_b = best_b if best_b < fit else _slo_batch_unbounded(dep, i_p, o_p, i_mean, o_mean, work.rate, spare, slo,
                                                                 max_batch_limit)
        mean = evaluate(dep, np.array([best_b]), i_mean, o_mean)
        row = _pick(mean, 0, 1)
        tail_row = _pick(tail, best_b - 1, fit)
        per_replica_tok = float(row["output_tokens_per_s"])
        serving = int(lo["serving"][best_b - 1])  # replicas the load needs
        replicas = serving + spare
        gpus = replicas * par.tp * par.pp
        price = hw.price_per_hour_usd
        try:
            sat = saturation(dep, work.input_tokens, work.output_tokens, best_b, micro_batches=par.pp)
        except PerfmodelError:  # the longest sampled request does not fit the KV pool: no closed form
            sat = {"rate_rps": None, "bound": None}
        lat_band = _latency_band(dep, best_b, i_p, o_p, i_mean, o_mean, float(lo["rate_per_replica"][best_b - 1]))
        served_tok = (work.rate * o_mean) if work.rate else per_replica_tok
        cost = gpus * price / (served_tok * 3600) * 1e6 if price else None
        options.append({
            "tp": par.tp, "pp": par.pp, "batch": best_b, "max_batch_fits": fit, "replicas": replicas, "gpus": gpus,
            "ttft_s": float(lo["ttft_s"][best_b - 1]), "tpot_s": float(lo["tpot_s"][best_b - 1]),
            "ttft_unloaded_s": float(tail_row["ttft_s"]), "tpot_unloaded_s": float(tail_row["tpot_s"]),
            "per_gpu_output_tokens_per_s": per_replica_tok / (par.tp * par.pp),
            "replica_output_tokens_per_s": per_replica_tok, "cost_per_million_output_tokens_usd": cost,
            "memory_per_gpu_bytes": float(tail_row["total_bytes"]),
            "binding": binding_constraint(tail_row, fit, slo_b), "spare": spare,
            "ttft_band_s": lat_band["ttft_s"], "tpot_band_s": lat_band["tpot_s"],
            "saturation_rps_per_replica": sat["rate_rps"], "saturation_bound": sat["bound"],
            # demand over capacity with every replica up, and with the spare ones down
            "rho": utilisation(work.rate, sat, replicas) if work.rate and sat["rate_rps"] else None,
            "rho_spare_down": utilisation(work.rate, sat, serving) if work.rate and sat["rate_rps"] else None})
    if not options:
        return {"feasible": False, "reason": "; ".join(rejected) or "no candidate configuration", "options": []}
    options.sort(key=lambda o: (o["gpus"], o["cost_per_million_output_tokens_usd"] or 0, -o["batch"]))
    best = options[0]
    band = {}
    for which in ("optimistic", "pessimistic"):
        alt = _replan_one(model, hw.with_efficiency(which), work, slo, p, best, max_batch_limit, exec_mode, spare)
        band[which] = alt
    return {"feasible": True, "model": model.name, "hardware": hw.name, "best": best, "band": band,
            "options": options, "rejected": rejected,
            "workload": {"input_mean": i_mean, "output_mean": o_mean, f"input_p{q:g}": i_p, f"output_p{q:g}": o_p,
                         "rate": work.rate}, "slo": dataclasses.asdict(slo), "spare": spare}


def _pick(d: dict, i: int, n: int) -> dict:
    """Entry i of every (possibly scalar) array in d, as a plain value."""
    return {k: np.broadcast_to(v, (n,))[i].item() if isinstance(v, (np.ndarray, np.generic)) else v
            for k, v in d.items()}


def loaded(dep: Deployment, b, i_p: int, o_p: int, i_mean: int, o_mean: int, rate: float | None, spare: int = 0,
           rate_per_replica: float | None = None) -> dict:
    """TTFT and TPOT of the percentile request on a replica serving its share of the load, per batch cap b.

    A replica at batch cap b serves cap(b) requests/s; the load needs ceil(rate / cap) of them (spare more are
    kept, and with the spare ones down each serving replica takes rate / serving, what the SLO is judged at).
    Without chunked prefill a step also runs the prompts admitted in it, so decode steps stretch by the prefill
    share of the replica's time: step = tpot(b) / (1 - lambda * P), lambda the replica's rate (per pipeline
    micro-batch) and P the mean prompt's prefill. A new request waits for the step in flight before its own
    prefill: TTFT = prefill + step. (Queueing beyond one step is the simulator's business.)
    """
    b = np.asarray(b)
    tail = evaluate(dep, b, i_p, o_p)
    mean = evaluate(dep, b, i_mean, o_mean)
    cap = mean["requests_per_s"]
    if rate_per_replica is not None:
        lam = np.full(b.shape, float(rate_per_replica))
        serving = np.ones(b.shape, dtype=np.int64)
    elif rate:
        serving = np.ceil(rate / cap).astype(np.int64)
        lam = rate / serving
    else:  # one replica at full load
        serving = np.ones(b.shape, dtype=np.int64)
        lam = cap
    prefill_share = lam / dep.parallelism.pp * mean["ttft_s"]
    step = tail["tpot_s"] / np.maximum(1.0 - prefill_share, 1e-3)
    return {"tail": tail, "tpot_s": step, "ttft_s": tail["ttft_s"] + step, "serving": serving,
            "rate_per_replica": lam, "capacity_rps": cap, "prefill_share": prefill_share}


def _slo_batch_unbounded(dep, i_p, o_p, i_mean, o_mean, rate, spare, slo, limit):
    b = np.arange(1, limit + 1)
    t = loaded(dep, b, i_p, o_p, i_mean, o_mean, rate, spare)
    ok = (t["ttft_s"] <= slo.ttft_s) & (t["tpot_s"] <= slo.tpot_s)
    return int(b[ok].max()) if ok.any() else 0


def _latency_band(dep: Deployment, batch: int, i_p: int, o_p: int, i_mean: int, o_mean: int, lam: float) -> dict:
    """TTFT and TPOT of this deployment at this batch and per-replica load under the hardware's optimistic and
    pessimistic efficiencies: [optimistic, pessimistic] seconds (the nominal lies between)."""
    out = {"ttft_s": [], "tpot_s": []}
    for which in ("optimistic", "pessimistic"):
        e = loaded(dataclasses.replace(dep, hardware=dep.hardware.with_efficiency(which)), np.array([batch]), i_p,
                   o_p, i_mean, o_mean, None, rate_per_replica=lam)
        out["ttft_s"].append(float(e["ttft_s"][0]))
        out["tpot_s"].append(float(e["tpot_s"][0]))
    return out


def _replan_one(model, hw, work, slo, p, best, limit, exec_mode=DEFAULT_EXEC, spare=0) -> dict:
    """The chosen parallelism under other efficiency factors: its batch, throughput and GPU count."""
    sub = plan_fixed(model, hw, work, slo, p, Parallelism(best["tp"], best["pp"]), limit, exec_mode, spare)
    return {k: sub.get(k) for k in ("batch", "gpus", "replicas", "tpot_s", "ttft_s", "per_gpu_output_tokens_per_s",
                                    "cost_per_million_output_tokens_usd")}


def plan_fixed(model, hw, work, slo, p, par, limit=1024, exec_mode=DEFAULT_EXEC, spare=0) -> dict:
    dep = Deployment(model, hw, par, p, exec_mode=exec_mode)
    q = slo.percentile
    i_mean, o_mean = int(np.mean(work.input_tokens)), int(np.mean(work.output_tokens))
    i_p, o_p = int(np.percentile(work.input_tokens, q)), int(np.percentile(work.output_tokens, q))
    fit = max_batch(dep, i_p + o_p, limit)
    if not fit:
        return {}
    b = np.arange(1, fit + 1)
    lo = loaded(dep, b, i_p, o_p, i_mean, o_mean, work.rate, spare)
    ok = (lo["ttft_s"] <= slo.ttft_s) & (lo["tpot_s"] <= slo.tpot_s)
    if not ok.any():
        return {"batch": 0}
    bb = int(b[ok].max())
    mean = evaluate(dep, np.array([bb]), i_mean, o_mean)
    tok = float(mean["output_tokens_per_s"][0])
    replicas = int(lo["serving"][bb - 1]) + spare
    gpus = replicas * par.tp * par.pp
    served = work.rate * o_mean if work.rate else tok
    return {"batch": bb, "gpus": gpus, "replicas": replicas, "tpot_s": float(lo["tpot_s"][bb - 1]),
            "ttft_s": float(lo["ttft_s"][bb - 1]), "per_gpu_output_tokens_per_s": tok / (par.tp * par.pp),
            "cost_per_million_output_tokens_usd": gpus * hw.price_per_hour_usd / (served * 3600) * 1e6
            if hw.price_per_hour_usd else None}


def check_slo(slo: SLO) -> SLO:
    if slo.ttft_s <= 0 or slo.tpot_s <= 0:
        raise PerfmodelError("--ttft/--tpot: SLOs must be positive seconds")
    if not 0 < slo.percentile <= 100:
        raise PerfmodelError(f"--percentile: {slo.percentile} is not valid; allowed: 0 < p <= 100")
    return slo
