"""The saturation point of one deployment replica in closed form: the highest request rate it sustains.

Under continuous batching a request costs the server its prompt's prefill plus its share of the decode steps it
rides in. At saturation the queue never empties, so the scheduler keeps the batch as full as max batch and the
KV pool allow (B sequences); each step then admits B/O new requests on average (a request lives one prefill step
and O-1 decode steps), so Bd = B (O-1)/O of the B sequences decode. A request's busy-time demand is

    d = P(I) + (O-1) * tau(Bd) / Bd        tau: one decode step of Bd sequences (host time per step included)

and the sustainable rate is 1/d: the rate at which the demanded busy fraction reaches 1. Utilisation is
rate / saturation rate (demand over capacity), which is not the simulator's "time busy": a replica at 50 % of
its capacity runs small batches and is busy more than half the time.

Step times come from the simulator's own step costs (perfmodel.planning.simulate.StepCosts), so the closed
form and the simulated knee are the same model, one without queues.
"""

from __future__ import annotations

import numpy as np

from perfmodel.errors import PerfmodelError
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.simulate import StepCosts, kv_pool_blocks

QUANTILES = 64  # a length distribution's prefill demand: the mean over this many quantiles of its samples


def kv_blocks_fit(dep: Deployment, block_tokens: int = 16) -> int:
    """KV blocks of block_tokens tokens that fit beside the weights: the pool simulate gives a replica."""
    return max(0, int(kv_pool_blocks(dep, block_tokens)))


def decode_step(costs: StepCosts, batch: int, ctx: float) -> float:
    """One decode step of `batch` sequences at context ctx, host time per step included."""
    return float(costs.decode(int(batch), float(ctx)))


def prefill_marginal(costs: StepCosts, tokens: int, batch: int, ctx: float, cached: int = 0,
                     per_step: float = 1.0) -> float:
    """What one prompt (tokens of it, after `cached` found in the prefix cache) adds to a step that also decodes
    `batch` sequences, when per_step such prompts ride each step: the ragged step's difference divided by them.
    Weights are read once per step, so the first prompt partly hides under the decode step's weight reads and
    the next ones do not: the cost is taken at floor and ceil of per_step prompts and interpolated. A
    prefill-only step pays the host time too."""
    dec = [(1, int(ctx))] * int(batch)
    own = (int(tokens), int(cached))
    base = float(costs.step(dec)) if dec else 0.0
    k = max(float(per_step), 1.0)
    lo, hi = int(np.floor(k)), int(np.ceil(k))
    cost = lambda n: (float(costs.step([own] * n + dec)) - base) / n  # noqa: E731
    if lo == hi:
        return cost(lo)
    f = k - lo
    return (1 - f) * cost(lo) + f * cost(hi)


def _lengths(x, name: str) -> np.ndarray:
    a = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 1):
        raise PerfmodelError(f"saturation: {name}: lengths must be finite numbers >= 1")
    return a


def saturation(dep: Deployment, input_tokens, output_tokens, max_batch: int = 256, kv_blocks: int | None = None,
               block_tokens: int = 16, costs: StepCosts | None = None, micro_batches: int = 1,
               shared_prefix: int = 0) -> dict:
    """Highest sustainable request rate of one replica, and what bounds it.

    input_tokens/output_tokens: a length or samples of a distribution (the demand is their mean).
    kv_blocks: the KV pool in blocks of block_tokens (None: what fits beside the weights, as simulate).
    shared_prefix: tokens every prompt shares, cached (prefix caching): their full blocks skip prefill and
    are held once in the pool.
    micro_batches: batches in flight at once (plan's pipeline model keeps pp of them, one per stage, so the
    capacity is pp times; the simulator runs one step at a time: 1).
    Returns rate_rps, bound ('prefill' | 'decode' | 'kv'), the batch at saturation and the demand terms.
    """
    inp, out = _lengths(input_tokens, "input_tokens"), _lengths(output_tokens, "output_tokens")
    if max_batch < 1:
        raise PerfmodelError(f"saturation: max_batch: must be >= 1, got {max_batch}")
    blocks_pool = kv_blocks_fit(dep, block_tokens) if kv_blocks is None else int(kv_blocks)
    i_mean, o_mean = float(inp.mean()), float(out.mean())
    dec_tokens = max(o_mean - 1.0, 0.0)  # tokens per request from decode steps (the first comes from prefill)
    # the prefix cache covers the shared prefix's full blocks, never a prompt's last token (its logits are computed)
    hit = (np.minimum(int(shared_prefix) // block_tokens, (inp - 1) // block_tokens) * block_tokens
           if shared_prefix > 0 else np.zeros_like(inp))
    hit_blocks = float(np.mean(hit)) / block_tokens
    # KV held per running sequence, averaged over its life: the prompt plus half its output, rounded up to blocks;
    # the cached prefix's blocks are held once for all
    per_seq_blocks = (i_mean + o_mean / 2) / block_tokens + 0.5 - hit_blocks
    kv_batch = int((blocks_pool - np.ceil(hit_blocks)) // per_seq_blocks) if per_seq_blocks > 0 else max_batch
    longest = float(np.max(inp) + np.max(out))
    if blocks_pool * block_tokens < longest or kv_batch < 1:
        raise PerfmodelError(f"saturation: the KV budget ({blocks_pool} blocks of {block_tokens} tokens) cannot hold "
                             f"one {int(longest)}-token request")
    batch = min(int(max_batch), kv_batch)
    per_step = batch / o_mean  # admissions per step at saturation (a request rides o_mean steps)
    dec_batch = max(1, int(round(batch * dec_tokens / o_mean))) if dec_tokens > 0 else 0
    # mean context of a decode step, weighted by decode tokens: prompt + half the output
    if dec_tokens > 0:
        w = np.maximum(np.broadcast_to(out, np.broadcast(inp, out).shape) - 1, 0)
        ii = np.broadcast_to(inp, w.shape)
        oo = np.broadcast_to(out, w.shape)
        ctx = float(np.sum(w * (ii + oo / 2)) / max(np.sum(w), 1e-30))
    else:
        ctx = i_mean
    costs = costs or StepCosts(dep)
    tau = decode_step(costs, dec_batch, ctx) if dec_batch else 0.0
    # prefill demand: the mean over the distribution's quantile midpoints (exact for a fixed length)
    mid = (np.arange(QUANTILES) + 0.5) / QUANTILES
    pairs = (np.stack([np.rint(np.quantile(inp, mid)), np.rint(np.quantile(hit, mid))], 1) if inp.size > QUANTILES
             else np.stack(np.broadcast_arrays(inp, hit), 1)).astype(np.int64)
    pf = {(i, h): prefill_marginal(costs, i - h, dec_batch, ctx, h, per_step) for i, h in {tuple(x) for x in pairs.tolist()}}
    prefill_s = float(np.mean([pf[tuple(x)] for x in pairs.tolist()]))
    decode_s = dec_tokens * tau / dec_batch if dec_batch else 0.0
    demand = prefill_s + decode_s
    rate = max(int(micro_batches), 1) / demand
    if prefill_s >= decode_s:
        bound = "prefill"
    elif kv_batch < max_batch:
        bound = "kv"
    else:
        bound = "decode"
    return {"rate_rps": rate, "output_tokens_per_s": rate * o_mean, "bound": bound,
            "batch": batch, "decode_batch": dec_batch, "max_batch": int(max_batch), "kv_batch": kv_batch,
            "kv_blocks": blocks_pool, "decode_step_s": tau, "decode_context": ctx,
            "prefill_s_per_request": prefill_s, "decode_s_per_request": decode_s, "demand_s_per_request": demand,
            "host_s_per_step": float(costs.host_s), "prefix_hit_tokens": float(np.mean(hit))}


def utilisation(rate: float, sat: dict | float, replicas: int = 1) -> float:
    """Demand over capacity: the offered rate over the saturation rate of `replicas` replicas."""
    cap = sat["rate_rps"] if isinstance(sat, dict) else float(sat)
    return float(rate) / (cap * max(int(replicas), 1))
