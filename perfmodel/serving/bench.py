"""serve-bench: the real serving loop on the reference engine, then the simulator on the same requests.

The loop runs in wall-clock time: requests arrive at their arrival_s (Poisson or a trace), the scheduler
runs one step after another, and every token gets the time its step ended. Each step's record says what it
ran (prefill tokens, decode sequences, the context it attended over) and how long it spent in the engine's
forward and outside it (scheduling, input preparation, bookkeeping): the host overhead per step the simulator
is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from perfmodel.errors import PerfmodelError
from perfmodel.planning.latency import latency_summary
from perfmodel.planning.workload import Requests
from perfmodel.serving.blocks import BlockPool
from perfmodel.serving.runner import RaggedRunner
from perfmodel.serving.scheduler import Scheduler, Sequence


@dataclass(frozen=True)
class ServeConfig:
    kv_blocks: int = 512
    block_tokens: int = 16
    chunked_prefill: int = 0
    max_batch: int = 64
    prefix_cache: bool = False


def corpus_tokens(tokenizer, chars: int = 400_000) -> np.ndarray:
    """Real English/technical text to cut prompts from: Python's pydoc topics, tokenised."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:chars]
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def make_prompts(corpus: np.ndarray, reqs: Requests, seed: int = 0) -> list[list[int]]:
    """Each request's prompt: its shared prefix (the corpus' first prefix_tokens tokens, the same for every
    request of the workload: a system prompt), then its own text cut at a random place of the corpus, to
    input_tokens in all."""
    rng = np.random.default_rng(seed + 7919)
    shared = reqs.shared_prefix()
    out = []
    for i, n in enumerate(reqs.input_tokens.astype(int)):
        k = int(shared[i])
        own = n - k
        if own >= len(corpus) - k:
            raise PerfmodelError(f"--input: {n} tokens exceed the prompt corpus ({len(corpus)} tokens)")
        start = int(rng.integers(k, len(corpus) - own))
        out.append(corpus[:k].tolist() + corpus[start:start + own].tolist())
    return out


def serve(model, reqs: Requests, prompts: list[list[int]], cfg: ServeConfig, warmup: bool = True,
          check_invariants: bool = False) -> dict:
    """Run the serving loop in real time; returns the per-request and per-step records."""
    reqs.check("serve-bench")
    pool = BlockPool(cfg.kv_blocks, cfg.block_tokens, cfg.prefix_cache)
    sched = Scheduler(pool, cfg.max_batch, cfg.chunked_prefill)
    runner = RaggedRunner(model, cfg.kv_blocks, cfg.block_tokens)
    seqs = [Sequence(i, list(p), len(p), int(o), float(a))
            for i, (p, o, a) in enumerate(zip(prompts, reqs.output_tokens, reqs.arrival_s))]
    for s in seqs:  # refuse a request the pool can never hold before starting the clock
        if sched.blocks_for(s.prompt_len + s.out_len) > pool.num_blocks:
            raise PerfmodelError(f"--kv-blocks: request {s.rid} needs {sched.blocks_for(s.prompt_len + s.out_len)} "
                                 f"blocks of {cfg.block_tokens} tokens; the pool has {cfg.kv_blocks}")
    if warmup:  # first calls allocate buffers and pick kernels: keep them off the clock
        p = np.asarray(prompts[0][:cfg.block_tokens * min(cfg.kv_blocks, 4)])
        slots = runner.kv.slots(list(range(sched.blocks_for(len(p)))), len(p))
        runner.forward(p, [(0, len(p), slots)])
        runner.forward(p[:1], [(0, 1, slots[:1])])
    steps = []
    n, nxt, done = len(seqs), 0, 0
    clock = time.perf_counter
    t_start = clock()
    while done < n:
        now = clock() - t_start
        while nxt < n and seqs[nxt].arrival_s <= now:
            sched.add(seqs[nxt])
            nxt += 1
        if not sched.running and not sched.waiting:
            time.sleep(max(0.0, seqs[nxt].arrival_s - (clock() - t_start)))
            continue
        t0 = clock()
        plan = sched.schedule()
        if not plan:
            if nxt >= n:
                raise PerfmodelError("serve-bench: the queue cannot make progress (a request needs more KV blocks "
                                     "than are free)")
            time.sleep(max(0.0, seqs[nxt].arrival_s - (clock() - t_start)))
            continue
        ids, sq = runner.inputs(plan)
        t1 = clock()
        toks = runner.forward(ids, sq)
        t2 = clock()
        finished = sched.update(plan, [int(t) if s.samples else None for s, t in zip(plan, toks)], t2 - t_start)
        done += len(finished)
        if check_invariants:
            pool.check(sched.owners())
        t3 = clock()
        # tokens are stamped when the step's bookkeeping is done, as the simulator ends a step
        for s in plan:
            if s.samples:
                s.seq.token_times[-1] = t3 - t_start
                if len(s.seq.token_times) == 1:
                    s.seq.first_token_s = t3 - t_start
        steps.append({"start_s": t0 - t_start, "forward_s": t2 - t1, "host_s": (t1 - t0) + (t3 - t2),
                      "prefill_tokens": sum(s.new for s in plan if not s.decode),
                      "prefill_seqs": sum(1 for s in plan if not s.decode),
                      "decode_seqs": sum(1 for s in plan if s.decode),
                      "sequences": [(s.new, s.start) for s in plan]})
    st = sched.stats
    return {"requests": [{"rid": s.rid, "arrival_s": s.arrival_s, "first_token_s": s.first_token_s,
                          "token_times": s.token_times, "prompt_tokens": s.prompt_len, "output_tokens": s.out_len,
                          "preemptions": s.preemptions, "output_ids": s.tokens[s.prompt_len:]} for s in seqs],
            "steps": steps,
            "stats": {"admissions": st.admissions, "prompt_tokens": st.prompt_tokens, "hit_tokens": st.hit_tokens,
                      "preemptions": st.preemptions, "finished": st.finished, "evictions": pool.evictions}}


def metrics(rec: dict, ttft_slo: float | None = None, tpot_slo: float | None = None) -> dict:
    """The simulator's figures from the real loop's records."""
    rs = rec["requests"]
    arrival = np.array([r["arrival_s"] for r in rs])
    first = np.array([r["first_token_s"] for r in rs])
    finish = np.array([r["token_times"][-1] for r in rs])
    out = np.array([r["output_tokens"] for r in rs])
    if any(len(r["token_times"]) != r["output_tokens"] for r in rs):
        raise PerfmodelError("serve-bench: a request did not produce exactly its output tokens")
    summary = latency_summary(arrival, first, finish, out, ttft_slo, tpot_slo)
    st = rec["stats"]
    steps = rec["steps"]
    busy = sum(s["forward_s"] + s["host_s"] for s in steps)
    return {**summary, "iterations": len(steps), "preemptions": st["preemptions"],
            "utilisation": float(busy / summary["duration_s"]),
            "prefix_hit_rate": st["hit_tokens"] / max(st["prompt_tokens"], 1),
            "host_overhead_per_step_s": float(np.mean([s["host_s"] for s in steps])) if steps else 0.0,
            "forward_per_step_s": float(np.mean([s["forward_s"] for s in steps])) if steps else 0.0}
