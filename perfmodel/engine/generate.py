"""The generation loop: prefill the prompt into the KV cache, then decode token by token (or recompute the
whole sequence each step with use_cache=False), recording what each phase did."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from perfmodel.engine.sampling import Sampler, SamplingParams
from perfmodel.engine.tracer import Tracer
from perfmodel.engine.transformer import KVCache, Transformer


@dataclass
class StepTrace:
    phase: str
    step: int
    new_tokens: int
    cache_tokens: int  # tokens held in the cache after the step
    cache_bytes: int  # bytes of the filled cache, from the real tensors
    time_s: float
    tokens: list[int] = field(default_factory=list)  # the token each sequence produced


@dataclass
class Generation:
    tokens: np.ndarray  # [batch, generated]
    lengths: np.ndarray  # generated tokens per sequence before EOS / max
    steps: list[StepTrace]
    tracer: Tracer
    peak_bytes: dict  # phase -> peak traced memory (numpy allocations)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
             eos_id: int | None = None, use_cache: bool = True, on_step=None) -> Generation:
    """Batched generation; prompts of different lengths are left-padded and masked."""
    be, tr = model.be, model.tr
    B = len(prompts)
    width = max(len(p) for p in prompts)
    pad = np.array([width - len(p) for p in prompts], dtype=np.int64)
    ids = np.zeros((B, width), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, pad[b]:] = p
    sampler = Sampler(sampling)
    max_tokens = width + max_new_tokens
    out = np.zeros((B, max_new_tokens), dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    lengths = np.full(B, max_new_tokens)
    steps: list[StepTrace] = []
    peaks: dict = {}
    cache = KVCache(be, model.spec, B, max_tokens)
    seq = ids
    for step in range(max_new_tokens):
        phase = "prefill" if step == 0 else "decode"
        tr.phase, tr.step = phase, step
        tracing_mem = not tracemalloc.is_tracing()
        if tracing_mem:
            tracemalloc.start()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        if use_cache:
            logits = model.forward(seq if step == 0 else out[:, step - 1:step], cache, pad=pad)
        else:  # recompute every token from scratch: same logits, quadratic cost
            cache = KVCache(be, model.spec, B, max_tokens)
            full = np.concatenate([ids, out[:, :step]], axis=1)
            logits = model.forward(full, cache, pad=pad)
        lg = be.to_numpy(logits[:, -1, :])
        ts = tr.start()
        nxt = sampler(lg)
        tr.record(ts, "sample", "elementwise", -1, lg.size, act_read_bytes=be.nbytes(logits[:, -1, :]),
                  act_write_bytes=nxt.size * 8)
        dt = time.perf_counter() - t0
        peaks[phase] = max(peaks.get(phase, 0), tracemalloc.get_traced_memory()[1])
        if tracing_mem:
            tracemalloc.stop()
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
        out[:, step] = nxt
        st = StepTrace(phase, step, int(seq.shape[1]) if step == 0 else 1, cache.length, cache.used_bytes(), dt,
                       nxt.tolist())
        steps.append(st)
        if on_step:
            on_step(st)
        if eos_id is not None:
            newly = (~done) & (nxt == eos_id)
            lengths[newly] = step + 1
            done |= newly
            if done.all():
                out = out[:, :step + 1]
                break
    return Generation(out, lengths, steps, tr, peaks)
