"""Discrete-event simulation of continuous batching (vLLM-style iteration-level scheduling).

Each iteration the scheduler admits waiting requests first-come-first-served while the batch has room and the
paged KV cache has free blocks for the prompt, runs their prefill (whole, or in chunks under a token budget
when chunked prefill is on) together with one decode step of every running sequence, and frees a sequence's
blocks when it finishes. When a decode step needs a new block and none is free, the newest running sequence is
preempted (its blocks freed; it is re-queued to recompute prompt + generated tokens). Step times come from the
cost model (tables precomputed over batch and context, so 10,000 requests simulate in seconds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.operators import kv_bytes_per_token_layer, phase_ops
from perfmodel.costmodel.parallel import comm_seconds, split_ops
from perfmodel.costmodel.roofline import op_timings, phase_summary
from perfmodel.errors import PerfmodelError
from perfmodel.planning.deploy import Deployment, memory_per_device
from perfmodel.planning.workload import Requests
from perfmodel.schemas import TOKENS_MAX, count, validate

CTX_BUCKET = 64


CHUNK_MIN = 16  # the smallest chunked-prefill budget (real engines use 256 to 8192 tokens)
TABLE_MAX = 2**21  # entries of the decode step-cost table (batch x context buckets): about 1 GB while built


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 256
    block_tokens: int = 16
    chunked_prefill: int = 0  # token budget per iteration for prefill chunks; 0: whole prompts at once

    def __post_init__(self) -> None:
        for f, rule in (("max_batch", count(1, 2**20)), ("block_tokens", count(1, 2**16)),
                        ("chunked_prefill", count(0, TOKENS_MAX))):
            validate(rule, getattr(self, f), f"--{f.replace('_', '-')}")
        if 0 < self.chunked_prefill < CHUNK_MIN:  # a budget of a few tokens takes one iteration per token
            raise PerfmodelError(f"--chunked-prefill: must be 0 (off) or an integer in [{CHUNK_MIN}, {TOKENS_MAX}], "
                                 f"got {self.chunked_prefill}")


class StepCosts:
    """Cost-model step times: decode over a (batch, context) table, prefill per (chunk, past) on demand."""

    def __init__(self, dep: Deployment, max_batch: int, max_ctx: int):
        self.dep = dep
        b = np.arange(1, max_batch + 1, dtype=np.float64)[:, None]
        c = np.arange(0, max_ctx + CTX_BUCKET, CTX_BUCKET, dtype=np.float64)[None, :]
        self.decode_table = self._time(b, 1, c, "decode")  # [batch-1, ctx bucket]
        self._prefill: dict = {}

    def _time(self, batch, new, past, phase):
        d = self.dep
        ops = split_ops(phase_ops(d.model, batch, new, past, d.precision, d.flash, phase=phase,
                                  exec_mode=d.exec_mode), d.parallelism, d.model)
        t = phase_summary(op_timings(ops, d.hardware, d.precision, d.exec_mode))["time_s"]
        comm = sum(comm_seconds(d.model, d.parallelism, d.hardware, np.asarray(batch) * new, d.precision).values())
        return np.asarray(t + comm, dtype=np.float64)

    def decode(self, batch: int, mean_ctx: float) -> float:
        return float(self.decode_table[batch - 1, min(int(mean_ctx // CTX_BUCKET), self.decode_table.shape[1] - 1)])

    def prefill(self, tokens: int, past: int = 0) -> float:
        key = (tokens, past // CTX_BUCKET)
        if key not in self._prefill:
            self._prefill[key] = float(self._time(1, tokens, (past // CTX_BUCKET) * CTX_BUCKET, "prefill"))
        return self._prefill[key]


def simulate(dep: Deployment, reqs: Requests, cfg: SchedulerConfig = SchedulerConfig(),
             ttft_slo: float | None = None, tpot_slo: float | None = None) -> dict:
    n = len(reqs.check("simulate"))
    par = dep.parallelism
    kv_tok = dep.model.num_layers * kv_bytes_per_token_layer(dep.model, dep.precision.kv_cache) / (par.tp * par.pp)
    mem = memory_per_device(dep, 0, 0)
    free_bytes = mem["usable_bytes"] - mem["weights_bytes"] - float(
        memory_per_device(dep, 1, 2048)["activation_bytes"])
    total_blocks = int(free_bytes // (kv_tok * cfg.block_tokens))
    longest = int((reqs.input_tokens + reqs.output_tokens).max())
    if total_blocks * cfg.block_tokens < longest:
        raise PerfmodelError(f"simulate: the KV budget ({total_blocks} blocks of {cfg.block_tokens} tokens) cannot "
                             f"hold one {longest}-token request beside the weights")
    # no batch is larger than the requests or the KV blocks, so the table need not be either
    table_batch = max(1, min(cfg.max_batch, n, total_blocks))
    entries = table_batch * ((longest + 1) // CTX_BUCKET + 2)
    if entries > TABLE_MAX:
        raise PerfmodelError(f"simulate: the decode cost table (batch {table_batch} x {entries // table_batch:,} "
                             f"context buckets = {entries:,} entries) exceeds {TABLE_MAX:,}; lower --max-batch "
                             "or the request lengths")
    costs = StepCosts(dep, table_batch, longest + 1)
    blocks = lambda tokens: -(-tokens // cfg.block_tokens)  # noqa: E731

    arrival, inp, out = reqs.arrival_s, reqs.input_tokens.astype(np.int64), reqs.output_tokens.astype(np.int64)
    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    generated = np.zeros(n, dtype=np.int64)
    prefilled = np.zeros(n, dtype=np.int64)  # prompt tokens (plus recomputed ones) in the cache
    to_prefill = inp.copy()  # tokens to prefill before decoding (grows on preemption: recompute)
    held = np.zeros(n, dtype=np.int64)  # KV blocks held
    waiting: deque = deque()
    running: list[int] = []
    free = total_blocks
    t, nxt, done, preemptions, iterations = 0.0, 0, 0, 0, 0
    busy = 0.0
    # every iteration runs work (a prefill chunk or a decode step) or jumps to the next arrival, so the loop is
    # bounded by the work; the bound below is the last resort against a scheduling bug (preemption thrash)
    chunk = cfg.chunked_prefill or int(inp.max())
    max_loops = 4 * (2 * n + int(out.sum()) + int((-(-inp // chunk)).sum())) + 10_000
    loops = 0
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
        # admit FCFS while the batch has room and the prompt's blocks are free
        while waiting and len(running) < cfg.max_batch:
            r = waiting[0]
            need = blocks(inp[r] + generated[r] + 1)  # prompt + generated so far (recomputed after a preemption)
            if need > free:
                break
            waiting.popleft()
            free -= need
            held[r] = need
            running.append(r)
        step = 0.0
        budget = cfg.chunked_prefill or np.iinfo(np.int64).max
        decoding = []
        for r in running:
            left = to_prefill[r] - prefilled[r]
            if left > 0:
                if budget <= 0:
                    continue
                chunk = int(min(left, budget))
                step += costs.prefill(chunk, int(prefilled[r]))
                budget -= chunk
                prefilled[r] += chunk
                if prefilled[r] == to_prefill[r] and generated[r] == 0:
                    generated[r] = 1  # prefill yields the first token
                    first_tok[r] = np.nan  # set after the step's time is known
            else:
                decoding.append(r)
        if decoding:
            ctx = float(np.mean(inp[decoding] + generated[decoding]))
            step += costs.decode(len(decoding), ctx)
        if step == 0.0:  # nothing could run: wait for an arrival, or stop when none is left to wait for
            if nxt >= n:
                head = waiting[0] if waiting else None
                raise PerfmodelError("simulate: the queue cannot make progress" + (
                    f" (request {head} needs {blocks(inp[head] + generated[head] + 1)} KV blocks, {free} free)"
                    if head is not None else ""))
            t = arrival[nxt]
            continue
        t += step
        busy += step
        iterations += 1
        for r in running:
            if generated[r] == 1 and np.isnan(first_tok[r]) and prefilled[r] == to_prefill[r]:
                first_tok[r] = t
        for r in decoding:
            generated[r] += 1
        # finish, or grow the cache (preempting the newest sequences when blocks run out)
        still = []
        for r in running:
            if generated[r] >= out[r] and prefilled[r] == to_prefill[r]:
                finish[r] = t
                free += held[r]
                held[r] = 0
                done += 1
            else:
                still.append(r)
        running = still
        for r in list(running):
            if r not in running:  # preempted a moment ago
                continue
            need = blocks(inp[r] + generated[r] + 1) - held[r]
            while need > free:  # preempt the newest sequence, this one last
                victim = running.pop()
                free += held[victim]
                held[victim] = 0
                to_prefill[victim] = inp[victim] + generated[victim]  # recompute prompt + generated
                prefilled[victim] = 0
                waiting.appendleft(victim)
                preemptions += 1
                if victim == r:
                    break
            if r in running and need > 0:
                free -= need
                held[r] += need
    ttft = first_tok - arrival
    tpot = np.where(out > 1, (finish - first_tok) / np.maximum(out - 1, 1), 0.0)
    e2e = finish - arrival
    span = finish.max() - arrival[0]
    good = np.ones(n, dtype=bool)
    if ttft_slo:
        good &= ttft <= ttft_slo
    if tpot_slo:
        good &= tpot <= tpot_slo
    pct = lambda x: {f"p{q}": float(np.percentile(x, q)) for q in (50, 90, 99)}  # noqa: E731
    return {"requests": n, "duration_s": float(span), "iterations": iterations, "preemptions": preemptions,
            "kv_blocks": total_blocks, "ttft_s": pct(ttft), "tpot_s": pct(tpot), "e2e_s": pct(e2e),
            "mean_ttft_s": float(ttft.mean()), "mean_tpot_s": float(tpot[out > 1].mean()) if (out > 1).any() else 0.0,
            "throughput_output_tokens_per_s": float(out.sum() / span),
            "throughput_requests_per_s": float(n / span), "goodput_requests_per_s": float(good.sum() / span),
            "slo_attainment": float(good.mean()), "utilisation": float(busy / span)}
