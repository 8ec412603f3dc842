"""Discrete-event simulation of continuous batching (vLLM-style iteration-level scheduling).

Each iteration the scheduler admits waiting requests first-come-first-served while the batch has room and the
paged KV cache has free blocks for every token they hold (less the shared-prefix blocks the prefix cache
already holds), runs their prefill (whole, or in chunks under a token budget when chunked prefill is on)
together with one decode step of every running sequence, and frees a sequence's blocks when it finishes. When
a sequence's next step needs a new block and none is free, the newest running sequence is preempted (its
blocks freed; it is re-queued to recompute prompt + generated tokens, and that recompute yields its next
token). The policy is the one perfmodel.serving's real loop runs (serve-bench compares the two).

A step is ONE ragged forward over all its sequences' new tokens (perfmodel.costmodel.ragged: weights read once,
attention per sequence), plus the server's host time per step outside the forward (hardware.host_overhead_us,
from a framework profile or measured by serve-bench). Step parts are memoised (body by token count, attention
by new tokens and context bucket, head by sequences), so 10,000 requests simulate in seconds.

Prefix caching (SchedulerConfig.prefix_cache, with Requests.prefix_tokens): the full blocks of the shared
prefix, once computed by one request, are found by every later one (a hit skips their prefill and shares their
KV blocks); they stay cached while referenced, and after that until the pool needs their blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.hierarchy import weight_footprint
from perfmodel.costmodel.operators import kv_bytes_per_token_layer
from perfmodel.costmodel.parallel import comm_seconds, split_ops
from perfmodel.costmodel.ragged import attention_ops, attention_seconds, body_ops, head_ops
from perfmodel.costmodel.roofline import op_timings
from perfmodel.errors import PerfmodelError
from perfmodel.planning.deploy import Deployment, memory_per_device
from perfmodel.planning.latency import latency_summary
from perfmodel.planning.workload import Requests
from perfmodel.schemas import TOKENS_MAX, count, validate

CTX_BUCKET = 64


CHUNK_MIN = 16  # the smallest chunked-prefill budget (real engines use 256 to 8192 tokens)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 256
    block_tokens: int = 16
    chunked_prefill: int = 0  # token budget per iteration for prefill chunks; 0: whole prompts at once
    kv_blocks: int = 0  # KV blocks in the pool; 0: as many as fit beside the weights
    prefix_cache: bool = False  # reuse the shared prefix's computed blocks across requests

    def __post_init__(self) -> None:
        for f, rule in (("max_batch", count(1, 2**20)), ("block_tokens", count(1, 2**16)),
                        ("chunked_prefill", count(0, TOKENS_MAX)), ("kv_blocks", count(0, 2**31))):
            validate(rule, getattr(self, f), f"--{f.replace('_', '-')}")
        if 0 < self.chunked_prefill < CHUNK_MIN:  # a budget of a few tokens takes one iteration per token
            raise PerfmodelError(f"--chunked-prefill: must be 0 (off) or an integer in [{CHUNK_MIN}, {TOKENS_MAX}], "
                                 f"got {self.chunked_prefill}")


class StepCosts:
    """Cost-model times of ragged steps, memoised by part: the shared body by the step's new tokens, each
    sequence's attention by (new tokens, context bucket), the head by the number of sequences."""

    def __init__(self, dep: Deployment):
        self.dep = dep
        self.host_s = dep.hardware.host_overhead_us * 1e-6
        m, p = dep.model, dep.precision
        probe = body_ops(m, 1, p, dep.flash, dep.exec_mode) + head_ops(m, 1, p, dep.flash, dep.exec_mode)
        self._footprint = weight_footprint(probe) if dep.hardware.memory_levels else None
        self._body: dict = {}
        self._attn: dict = {}
        self._head: dict = {}

    def _sum(self, ops) -> float:
        d = self.dep
        ops = split_ops(ops, d.parallelism, d.model)
        return sum(float(np.sum(t.time_s)) * t.op.layers for t in op_timings(ops, d.hardware, d.precision, d.exec_mode))

    def body(self, tokens: int, decode: bool) -> float:
        key = (tokens, decode)
        if key not in self._body:
            d = self.dep
            comm = sum(comm_seconds(d.model, d.parallelism, d.hardware, tokens, d.precision).values())
            self._body[key] = self._sum(body_ops(d.model, tokens, d.precision, d.flash, d.exec_mode, decode)) + float(comm)
        return self._body[key]

    def attention(self, new: int, past: int) -> float:
        key = (new, past // CTX_BUCKET)
        if key not in self._attn:
            d = self.dep
            mid = (past // CTX_BUCKET) * CTX_BUCKET + (CTX_BUCKET // 2 if new == 1 else 0)  # decode: bucket middle
            ops = split_ops(attention_ops(d.model, new, mid, d.precision, d.flash, d.exec_mode), d.parallelism,
                            d.model)
            self._attn[key] = attention_seconds(ops, d.hardware, d.precision, d.exec_mode, self._footprint)
        return self._attn[key]

    def head(self, sequences: int) -> float:
        if sequences not in self._head:
            d = self.dep
            # the head ops hold no layer ops: host glue is counted once per step, in the body
            ops = head_ops(d.model, sequences, d.precision, d.flash, d.exec_mode)
            self._head[sequences] = sum(float(np.sum(t.time_s)) * t.op.layers for t in
                                        op_timings(ops, d.hardware, d.precision, d.exec_mode, host=False))
        return self._head[sequences]

    def step(self, seqs: list[tuple[int, int]]) -> float:
        """One ragged step over [(new tokens, cached tokens)], host time included."""
        total = sum(n for n, _ in seqs)
        return (self.body(total, all(n == 1 for n, _ in seqs)) + sum(self.attention(n, p) for n, p in seqs)
                + self.head(len(seqs)) + self.host_s)

    def prefill(self, tokens: int, past: int = 0) -> float:
        return self.step([(tokens, past)])

    def decode(self, batch: int, ctx: float) -> float:
        return self.step([(1, int(ctx))] * batch)


def kv_pool_blocks(dep: Deployment, block_tokens: int) -> int:
    """KV blocks that fit beside the weights and one prefill's activations."""
    par = dep.parallelism
    kv_tok = dep.model.num_layers * kv_bytes_per_token_layer(dep.model, dep.precision.kv_cache) / (par.tp * par.pp)
    mem = memory_per_device(dep, 0, 0)
    free_bytes = mem["usable_bytes"] - mem["weights_bytes"] - float(
        memory_per_device(dep, 1, 2048)["activation_bytes"])
    return int(free_bytes // (kv_tok * block_tokens))


SIM_MAX_REQUESTS = 1_000_000


def simulate(dep: Deployment, reqs: Requests, cfg: SchedulerConfig = SchedulerConfig(),
             ttft_slo: float | None = None, tpot_slo: float | None = None) -> dict:
    n = len(reqs.check("simulate"))
    if n > SIM_MAX_REQUESTS:  # the event loop runs ~1,000 requests/s: past this it would run for hours
        raise PerfmodelError(f"simulate: {n:,} requests; allowed: at most {SIM_MAX_REQUESTS:,} (for more, plan's "
                             "closed-form saturation scales without simulating)")
    bt = cfg.block_tokens
    total_blocks = cfg.kv_blocks or kv_pool_blocks(dep, bt)
    longest = int((reqs.input_tokens + reqs.output_tokens).max())
    if total_blocks * bt < longest:
        raise PerfmodelError(f"simulate: the KV budget ({total_blocks} blocks of {bt} tokens) cannot "
                             f"hold one {longest}-token request" + ("" if cfg.kv_blocks else " beside the weights"))
    costs = StepCosts(dep)
    blocks = lambda tokens: -(-tokens // bt)  # noqa: E731

    arrival, inp, out = reqs.arrival_s, reqs.input_tokens.astype(np.int64), reqs.output_tokens.astype(np.int64)
    # the shared prefix's full blocks, the most a hit can cover (never the prompt's last token: its logits
    # must be computed); one shared prefix per workload (every request's prefix_tokens are the same tokens)
    pre_blocks = np.minimum(reqs.shared_prefix() // bt, (inp - 1) // bt) if cfg.prefix_cache else np.zeros(n, int)
    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    generated = np.zeros(n, dtype=np.int64)
    prefilled = np.zeros(n, dtype=np.int64)  # tokens in the cache (prompt, then generated ones)
    to_prefill = inp.copy()  # tokens to prefill before decoding (prompt + generated after a preemption)
    held = np.zeros(n, dtype=np.int64)  # private KV blocks held
    shares = np.zeros(n, dtype=np.int64)  # shared-prefix blocks referenced
    cached = 0  # shared-prefix blocks computed and in the pool
    refs = 0  # running requests referencing them
    waiting: deque = deque()
    running: list[int] = []
    free = total_blocks  # blocks neither held privately nor holding the referenced prefix (cached-free count)
    t, nxt, done, preemptions, iterations = 0.0, 0, 0, 0, 0
    hit_tokens = prompt_tokens = 0
    busy = 0.0
    chunk = cfg.chunked_prefill or int(inp.max())
    max_loops = 4 * (2 * n + int(out.sum()) + int((-(-inp // chunk)).sum())) + 10_000
    loops = 0

    def take(k: int) -> None:  # k blocks from the free ones, evicting the unreferenced cached prefix last
        nonlocal free, cached
        free -= k
        if refs == 0 and cached and free < cached:  # the pool reuses the cached prefix's blocks
            cached = max(0, free)

    def release_shares(r: int) -> None:
        nonlocal refs, free
        if shares[r]:
            refs -= 1
            shares[r] = 0
            if refs == 0:
                free += cached  # unreferenced: free, still cached until reused

    while done < n:
        loops += 1
        if loops > max_loops:
            raise PerfmodelError(f"simulate: no progress after {max_loops:,} scheduler iterations ({done} of {n} "
                                 f"requests done, {preemptions} preemptions); the KV budget thrashes")
        while nxt < n and arrival[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        if not running and not waiting:
            t = arrival[nxt]
            continue
        # admit FCFS while the batch has room and the blocks of every token the request holds are free
        while waiting and len(running) < cfg.max_batch:
            r = waiting[0]
            tokens = inp[r] + generated[r]
            hits = int(min(cached, pre_blocks[r])) if cfg.prefix_cache else 0
            need = blocks(tokens) - hits
            if need + (cached if hits and refs == 0 else 0) > free:
                break
            waiting.popleft()
            if hits:
                if refs == 0:
                    free -= cached  # the cached prefix is referenced again: no longer free
                refs += 1
                shares[r] = hits
            take(need)
            held[r] = need
            prefilled[r] = hits * bt
            to_prefill[r] = tokens
            hit_tokens += hits * bt
            prompt_tokens += tokens
            running.append(r)
        budget = cfg.chunked_prefill or np.iinfo(np.int64).max
        work, decoding, chunks = [], [], []
        for r in running:
            left = to_prefill[r] - prefilled[r]
            if left > 0:
                if budget <= 0:
                    continue
                c = int(min(left, budget))
                budget -= c
                work.append((c, int(prefilled[r])))
                chunks.append((r, c))
            else:
                work.append((1, int(inp[r] + generated[r] - 1)))
                decoding.append(r)
        if not work:  # nothing could run: wait for an arrival, or stop when none is left to wait for
            if nxt >= n:
                head = waiting[0] if waiting else None
                raise PerfmodelError("simulate: the queue cannot make progress" + (
                    f" (request {head} needs {blocks(inp[head] + generated[head])} KV blocks, {free} free)"
                    if head is not None else ""))
            t = arrival[nxt]
            continue
        step = costs.step(work)
        t += step
        busy += step
        iterations += 1
        for r, c in chunks:
            prefilled[r] += c
            if cfg.prefix_cache and pre_blocks[r] > cached and shares[r] == 0:
                # this request computed prefix blocks: they become the cache's (shared from now on)
                now = int(min(prefilled[r] // bt, pre_blocks[r]))
                if now > cached:
                    grow = now - cached
                    held[r] -= grow
                    if refs == 0 and cached:
                        free -= cached  # the older cached part is referenced again
                    cached = now
                    refs += 1
                    shares[r] = now
                    # (the blocks move from private to shared: the free count is unchanged)
            if prefilled[r] == to_prefill[r]:
                generated[r] += 1  # a prefill (or a recompute) yields the next token
                if np.isnan(first_tok[r]):
                    first_tok[r] = t
        for r in decoding:
            prefilled[r] += 1
            generated[r] += 1
        # finish, or grow the cache (preempting the newest sequences when blocks run out)
        still = []
        for r in running:
            if generated[r] >= out[r] and prefilled[r] == inp[r] + generated[r] - 1:
                finish[r] = t
                free += held[r]
                held[r] = 0
                release_shares(r)
                done += 1
            else:
                still.append(r)
        running = still
        for r in list(running):
            if r not in running:  # preempted a moment ago
                continue
            need = blocks(inp[r] + generated[r]) - held[r] - shares[r]
            while need > free:  # preempt the newest sequence, this one last
                victim = running.pop()
                free += held[victim]
                held[victim] = 0
                release_shares(victim)
                to_prefill[victim] = inp[victim] + generated[victim]  # recompute prompt + generated
                prefilled[victim] = 0
                waiting.appendleft(victim)
                preemptions += 1
                if victim == r:
                    break
            if r in running and need > 0:
                take(need)
                held[r] += need
    summary = latency_summary(arrival, first_tok, finish, out, ttft_slo, tpot_slo)
    return {**summary, "iterations": iterations, "preemptions": preemptions, "kv_blocks": total_blocks,
            "utilisation": float(busy / summary["duration_s"]),
            "prefix_hit_rate": hit_tokens / max(prompt_tokens, 1),
            "host_overhead_per_step_s": costs.host_s}
