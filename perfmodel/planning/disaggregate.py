"""Prefill/decode disaggregation: P prefill instances and D decode instances of one deployment shape.

Prefill pool: one global FCFS queue; an idle instance takes the prompts at its head (whole prompts, up to a
token budget per step: --chunked-prefill's budget, else PREFILL_TOKENS or the longest prompt) and runs them in
one ragged prefill step. The step's end is the request's first token (the prefill samples it, as in DistServe),
so TTFT is queueing plus prefill on the prefill pool alone.

KV transfer: the prompt's KV (perfmodel.costmodel.operators.kv_cache_bytes, sliding windows capped) leaves over
the hardware YAML's interconnect, costed like the parallel collectives (perfmodel.costmodel.parallel): each of
the instance's tp*pp devices sends its shard over its own link in parallel,
    t = bytes / (tp * pp) / link bandwidth + link latency,
and one instance's transfers queue on its link in order (overlapped with its next prefill steps).

Decode pool: one global FCFS queue in order of KV arrival; an instance admits the head when its batch has room
and its KV pool has the blocks of the whole request (prompt + output: reserved at admission, because a
preempted decode would have to be re-prefilled on the other pool, which is not modelled). Every step is a pure
decode step of its running sequences: no prompt ever stalls it, which is what disaggregation buys. The first
token's gap (transfer and decode queueing) is part of TPOT.

Closed-form capacity of a split: min(P * prefill capacity, D * decode capacity) per instance at saturation,
priced on the simulator's own step costs (as perfmodel.planning.saturation does for a colocated replica).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.operators import kv_cache_bytes
from perfmodel.errors import PerfmodelError, show
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.latency import latency_summary, percentiles, request_latencies
from perfmodel.planning.simulate import SchedulerConfig, StepCosts, kv_pool_blocks
from perfmodel.planning.workload import Requests

PREFILL_TOKENS = 8192  # prompt tokens per prefill-pool step without a chunked budget (vLLM's default budget)
INSTANCES_MAX = 256


@dataclass(frozen=True)
class Split:
    prefill: int
    decode: int

    @staticmethod
    def parse(text: str) -> "Split":
        """'P:D', both integers in [1, INSTANCES_MAX]."""
        parts = str(text).split(":")
        try:
            p, d = (int(x) for x in parts)
        except ValueError:
            p = d = 0
        if len(parts) != 2 or not (1 <= p <= INSTANCES_MAX and 1 <= d <= INSTANCES_MAX):
            raise PerfmodelError(f"--disaggregate: {show(text)} is not valid; allowed: P:D, prefill and decode "
                                 f"instances, integers in [1, {INSTANCES_MAX}] (e.g. 1:3)")
        return Split(p, d)

    @property
    def instances(self) -> int:
        return self.prefill + self.decode

    def __str__(self) -> str:
        return f"{self.prefill}:{self.decode}"


def kv_transfer_bytes(dep: Deployment, prompt_tokens) -> np.ndarray:
    """Bytes of the prompt's KV cache, all devices of the instance together."""
    return np.asarray(kv_cache_bytes(dep.model, np.asarray(prompt_tokens), 1, dep.precision.kv_cache),
                      dtype=np.float64)


def kv_transfer_s(dep: Deployment, prompt_tokens) -> np.ndarray:
    """Seconds to move the prompt's KV from a prefill to a decode instance: each of the tp*pp devices sends its
    shard over its own link, in parallel."""
    link = dep.hardware.interconnect
    if link is None:
        raise PerfmodelError(f"--disaggregate: hardware {dep.hardware.name} has no interconnect to move the KV "
                             "cache over; allowed: hardware whose YAML has interconnect.bandwidth_gbps and latency_us")
    shards = dep.parallelism.tp * dep.parallelism.pp
    return kv_transfer_bytes(dep, prompt_tokens) / shards / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6


def _budget(cfg: SchedulerConfig, inp: np.ndarray) -> int:
    return int(max(cfg.chunked_prefill or PREFILL_TOKENS, int(inp.max())))


def prefill_pool(costs: StepCosts, arrival: np.ndarray, inp: np.ndarray, instances: int, cfg: SchedulerConfig):
    """First-token time and instance of every request on `instances` prefill instances; busy seconds."""
    n = len(arrival)
    budget = _budget(cfg, inp)
    first = np.full(n, np.nan)
    where = np.zeros(n, dtype=np.int64)
    free_at = [(0.0, k) for k in range(instances)]  # (time the instance is idle, instance)
    queue: deque = deque()
    nxt = done = 0
    busy = 0.0
    while done < n:
        t, k = heapq.heappop(free_at)
        while nxt < n and arrival[nxt] <= t:
            queue.append(nxt)
            nxt += 1
        if not queue:  # idle until the next arrival
            heapq.heappush(free_at, (float(arrival[nxt]), k))
            continue
        batch, tokens = [queue.popleft()], 0
        tokens = int(inp[batch[0]])
        while queue and len(batch) < cfg.max_batch and tokens + inp[queue[0]] <= budget:
            tokens += int(inp[queue[0]])
            batch.append(queue.popleft())
        step = costs.step([(int(inp[r]), 0) for r in batch])
        busy += step
        first[batch] = t + step
        where[batch] = k
        done += len(batch)
        heapq.heappush(free_at, (t + step, k))
    return first, where, busy


def decode_pool(costs: StepCosts, ready: np.ndarray, inp: np.ndarray, out: np.ndarray, instances: int,
                cfg: SchedulerConfig, pool_blocks: int):
    """Finish time of every request (rows with out > 1) decoded on `instances` decode instances from `ready`
    (KV arrival); steps and busy seconds."""
    bt = cfg.block_tokens
    need = -(-(inp + out) // bt)
    order = np.argsort(ready, kind="stable")
    finish = np.full(len(ready), np.nan)
    gen = np.ones(len(ready), dtype=np.int64)  # the prefill gave the first token
    running: list[list[int]] = [[] for _ in range(instances)]
    free = [pool_blocks] * instances
    clock = [(0.0, k) for k in range(instances)]
    waiting: deque = deque()
    qi, left, steps, busy = 0, len(order), 0, 0.0
    while left:
        t, k = heapq.heappop(clock)
        while qi < len(order) and ready[order[qi]] <= t:
            waiting.append(int(order[qi]))
            qi += 1
        run = running[k]
        while waiting and len(run) < cfg.max_batch and need[waiting[0]] <= free[k]:
            r = waiting.popleft()
            run.append(r)
            free[k] -= int(need[r])
        if not run:
            if qi < len(order):  # idle until the next KV arrives
                heapq.heappush(clock, (max(t, float(ready[order[qi]])), k))
            elif not waiting:
                continue  # nothing left for this instance
            else:  # pragma: no cover - admission of an empty instance always succeeds (checked by the caller)
                raise PerfmodelError("--disaggregate: a request does not fit an empty decode instance")
            continue
        step = costs.step([(1, int(inp[r] + gen[r] - 1)) for r in run])
        t += step
        busy += step
        steps += 1
        still = []
        for r in run:
            gen[r] += 1
            if gen[r] >= out[r]:
                finish[r] = t
                free[k] += int(need[r])
                left -= 1
            else:
                still.append(r)
        running[k] = still
        heapq.heappush(clock, (t, k))
    return finish, steps, busy


def run_split(dep: Deployment, reqs: Requests, cfg: SchedulerConfig, split: Split) -> dict:
    """The raw per-request times of one disaggregated run (arrays): arrival, first token, KV ready, finish."""
    reqs.check("simulate")
    if cfg.prefix_cache:
        raise PerfmodelError("--disaggregate: prefix caching is not modelled across pools; allowed: "
                             "--no-prefix-cache with --disaggregate")
    arrival = np.asarray(reqs.arrival_s, dtype=np.float64)
    inp, out = reqs.input_tokens.astype(np.int64), reqs.output_tokens.astype(np.int64)
    bt = cfg.block_tokens
    pool = cfg.kv_blocks or kv_pool_blocks(dep, bt)
    longest = int((inp + out).max())
    if pool * bt < longest:
        raise PerfmodelError(f"--disaggregate: a decode instance's KV budget ({pool} blocks of {bt} tokens) cannot "
                             f"hold one {longest}-token request")
    costs = StepCosts(dep)
    first, where, p_busy = prefill_pool(costs, arrival, inp, split.prefill, cfg)
    tx = kv_transfer_s(dep, inp)
    ready = np.full(len(arrival), np.nan)
    link_free = np.zeros(split.prefill)
    for r in np.argsort(first, kind="stable"):  # one link per prefill instance, transfers in order
        if out[r] <= 1:
            continue  # the prefill's token was the whole answer: nothing to decode
        start = max(first[r], link_free[where[r]])
        ready[r] = link_free[where[r]] = start + tx[r]
    dec = out > 1
    finish = first.copy()
    f, steps, d_busy = decode_pool(costs, ready[dec], inp[dec], out[dec], split.decode, cfg, pool)
    finish[dec] = f
    return {"arrival": arrival, "first": first, "ready": ready, "finish": finish, "out": out, "tx": tx,
            "prefill_busy_s": p_busy, "decode_busy_s": d_busy, "decode_steps": steps, "kv_blocks": pool,
            "host_s": costs.host_s}


def simulate_split(dep: Deployment, reqs: Requests, cfg: SchedulerConfig = SchedulerConfig(),
                   ttft_slo: float | None = None, tpot_slo: float | None = None, split: Split = Split(1, 1)) -> dict:
    """simulate()'s summary for a disaggregated deployment, plus its pools' figures under 'disaggregation'."""
    x = run_split(dep, reqs, cfg, split)
    summary = latency_summary(x["arrival"], x["first"], x["finish"], x["out"], ttft_slo, tpot_slo)
    span = summary["duration_s"]
    return {**summary, "iterations": x["decode_steps"], "preemptions": 0, "kv_blocks": x["kv_blocks"],
            "utilisation": (x["prefill_busy_s"] + x["decode_busy_s"]) / (span * split.instances),
            "prefix_hit_rate": 0.0, "host_overhead_per_step_s": x["host_s"],
            "disaggregation": {"prefill": split.prefill, "decode": split.decode,
                               "kv_transfer_s": percentiles(x["tx"]), "kv_transfer_bytes_mean":
                                   float(kv_transfer_bytes(dep, reqs.input_tokens).mean()),
                               "prefill_busy": x["prefill_busy_s"] / (span * split.prefill),
                               "decode_busy": x["decode_busy_s"] / (span * split.decode)}}


def latencies(x: dict):
    """TTFT, TPOT and E2E of every request of a run_split result."""
    return request_latencies(x["arrival"], x["first"], x["finish"], x["out"])


def split_capacity(dep: Deployment, input_tokens, output_tokens, cfg: SchedulerConfig = SchedulerConfig(),
                   costs: StepCosts | None = None) -> dict:
    """Requests/s one prefill instance and one decode instance sustain (closed form, at saturation).

    Prefill: a saturated instance fills each step with the prompts its token budget takes (k = budget // I);
    capacity k / step(k prompts). Decode: the batch the KV pool holds with whole requests reserved (B), each
    request riding O-1 decode steps: capacity B / ((O-1) * tau(B)), tau at the mean context I + O/2."""
    inp = np.atleast_1d(np.asarray(input_tokens, dtype=np.float64))
    out = np.atleast_1d(np.asarray(output_tokens, dtype=np.float64))
    costs = costs or StepCosts(dep)
    i_mean, o_mean = float(inp.mean()), float(out.mean())
    budget = _budget(cfg, inp.astype(np.int64))
    k = int(max(1, min(cfg.max_batch, budget // max(int(round(i_mean)), 1))))
    prefill_rps = k / float(costs.step([(int(round(i_mean)), 0)] * k))
    pool = cfg.kv_blocks or kv_pool_blocks(dep, cfg.block_tokens)
    per_req = np.ceil((i_mean + o_mean) / cfg.block_tokens)
    batch = int(max(1, min(cfg.max_batch, pool // per_req)))
    dec_tokens = max(o_mean - 1.0, 0.0)
    tau = float(costs.decode(batch, i_mean + o_mean / 2))
    decode_rps = batch / (dec_tokens * tau) if dec_tokens > 0 else float("inf")
    return {"prefill_rps_per_instance": prefill_rps, "decode_rps_per_instance": decode_rps,
            "prefill_batch": k, "decode_batch": batch, "decode_step_s": tau}


def split_saturation(cap: dict, split: Split) -> dict:
    """The split's highest sustainable rate and the pool that bounds it."""
    p = split.prefill * cap["prefill_rps_per_instance"]
    d = split.decode * cap["decode_rps_per_instance"]
    return {"rate_rps": min(p, d), "bound": "prefill" if p <= d else "decode", "prefill_rps": p, "decode_rps": d}


def plan_split(dep: Deployment, reqs: Requests, cfg: SchedulerConfig, ttft_slo: float, tpot_slo: float,
               percentile: float = 90.0, max_instances: int = 64, rate: float | None = None) -> dict:
    """The cheapest P:D (fewest instances) whose simulated percentile TTFT and TPOT meet the SLO and whose
    closed-form capacity sustains the offered rate (rho < 1: a finite run of an overloaded split can pass its
    SLO and still queue without bound). Among equally cheap splits, the one with the most slack.

    Instances are tried in order of total count, so the first total with a feasible split is the minimum; the
    closed-form capacities give every split's lower bounds on P and D (rho < 1), which skip the hopeless ones."""
    # the offered rate (a Poisson draw's own mean rate wobbles around it), else the trace's
    rate = rate or len(reqs) / max(float(reqs.arrival_s[-1] - reqs.arrival_s[0]), 1e-12)
    cap = split_capacity(dep, reqs.input_tokens, reqs.output_tokens, cfg)
    p_lo = max(1, int(np.floor(rate / cap["prefill_rps_per_instance"])) + 1)
    d_lo = max(1, int(np.floor(rate / cap["decode_rps_per_instance"])) + 1)
    tried = []
    for total in range(p_lo + d_lo, max_instances + 1):
        found = []
        for p in range(p_lo, total - d_lo + 1):
            s = Split(p, total - p)
            lat = latencies(run_split(dep, reqs, cfg, s))
            ttft, tpot = (float(np.percentile(v, percentile)) for v in lat[:2])
            row = {"prefill": p, "decode": total - p, "instances": total, f"ttft_p{percentile:g}_s": ttft,
                   f"tpot_p{percentile:g}_s": tpot, "rho": rate / split_saturation(cap, s)["rate_rps"],
                   "meets_slo": bool(ttft <= ttft_slo and tpot <= tpot_slo)}
            tried.append(row)
            if row["meets_slo"] and row["rho"] < 1:
                found.append((max(ttft / ttft_slo, tpot / tpot_slo), row))
        if found:
            best = min(found, key=lambda f: f[0])[1]
            return {"feasible": True, "best": best, "rate_rps": rate, "capacity": cap, "tried": tried}
    return {"feasible": False, "best": None, "rate_rps": rate, "capacity": cap, "tried": tried,
            "reason": f"no split of at most {max_instances} instances meets TTFT <= {ttft_slo:g} s and "
                      f"TPOT <= {tpot_slo:g} s at {rate:.3g} req/s"}


PLAN_REQUESTS = 1000  # Poisson requests the plan simulates per split


def plan_requests(input_tokens, output_tokens, rate: float, n: int = PLAN_REQUESTS, seed: int = 0) -> Requests:
    """n Poisson arrivals at `rate` carrying the plan's sampled lengths (cycled when fewer than n)."""
    if not rate or rate <= 0:
        raise PerfmodelError("--disaggregate: the split is planned for a load; allowed: with --rate R (> 0) or "
                             "a --trace")
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(np.atleast_1d(input_tokens))
    return Requests(np.cumsum(rng.exponential(1.0 / rate, n)), np.atleast_1d(input_tokens)[idx].astype(np.int64),
                    np.atleast_1d(output_tokens)[idx].astype(np.int64))


def plan_disaggregated(dep: Deployment, reqs: Requests, ttft_slo: float, tpot_slo: float, percentile: float = 90.0,
                       cfg: SchedulerConfig = SchedulerConfig(), max_instances: int = 64,
                       rate: float | None = None) -> dict:
    """plan_split for one deployment shape, with GPUs, cost and the chosen split's latency band (the same
    requests under the hardware's optimistic and pessimistic efficiencies)."""
    import dataclasses

    res = plan_split(dep, reqs, cfg, ttft_slo, tpot_slo, percentile, max_instances, rate)
    best = res["best"]
    if best is None:
        return res
    par = dep.parallelism
    split = Split(best["prefill"], best["decode"])
    best["gpus"] = split.instances * par.tp * par.pp
    best["tp"], best["pp"] = par.tp, par.pp
    out_rate = res["rate_rps"] * float(np.mean(reqs.output_tokens))
    price = dep.hardware.price_per_hour_usd
    best["cost_per_million_output_tokens_usd"] = best["gpus"] * price / (out_rate * 3600) * 1e6 if price else None
    for key, v in (("ttft", 0), ("tpot", 1)):
        best[f"{key}_band_s"] = [float(np.percentile(latencies(run_split(
            dataclasses.replace(dep, hardware=dep.hardware.with_efficiency(w)), reqs, cfg, split))[v], percentile))
            for w in ("optimistic", "pessimistic")]
    return res
