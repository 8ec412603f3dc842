"""Speculative decoding in the engine: a drafter proposes up to gamma tokens, the target verifies them in one
forward over gamma+1 new tokens, and standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023)
keeps the output distributed exactly as the target's: draft token x is accepted with probability
min(1, p(x)/q(x)); at the first rejection the replacement is drawn from max(0, p - q) renormalised; when all
are accepted a bonus token is drawn from the target's next distribution. Greedy decoding is the special case
of one-hot p and q, so its output equals plain greedy decoding token for token.

Both KV caches roll back what was rejected by resetting their length (the rejected entries are overwritten by
the next forward): no bytes move, which is what the cost model's `kv_rollback` says too.

Drafters:
- `NgramDrafter` (prompt lookup): the continuation of the latest earlier occurrence of the context's last n
  tokens, n from n_max down to 1; a point-mass q. No model, no FLOPs.
- `ModelDrafter`: a small model with its own KV cache (perfmodel.engine.quantised builds the target with int8
  weights for it). Tokens it has not seen yet (the last emitted one, and after a full acceptance the last
  draft as well) are fed in its first forward of the next step, so that forward has 1 or 2 new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from perfmodel.engine.sampling import SamplingParams, filtered_probs
from perfmodel.engine.transformer import KVCache, Transformer
from perfmodel.errors import PerfmodelError

DRAFTERS = ("ngram", "int8")


@dataclass
class Forward:
    """One forward pass as the cost model needs it: which model, new tokens, tokens already cached."""
    model: str  # "target" | "draft"
    phase: str
    step: int
    new: int
    past: int
    logits: int  # positions that produced logits (the verify pass: all of them)
    rollback: bool = False  # the cache was rolled back after it (a step's verify and its last draft forward)
    sampled: bool = True  # the draft's prefill only fills its cache


@dataclass
class SpecStep:
    proposed: int  # draft tokens the target verified
    accepted: int
    emitted: list[int]
    draft_s: float
    verify_s: float


@dataclass
class SpecGeneration:
    tokens: list[int]
    prefill_s: float  # the target's prefill and first token (and the draft model's prefill)
    steps: list[SpecStep] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)

    @property
    def decode_s(self) -> float:
        return sum(s.draft_s + s.verify_s for s in self.steps)

    @property
    def acceptance_rate(self) -> float:
        """Per-token acceptance α as the geometric model of speculative decoding defines it: accepted drafts over
        the drafts the target judged (all accepted ones plus the one rejection per step that had one), so that
        (1 - α^(γ+1))/(1 - α) predicts the tokens per target step. Steps with no proposal do not count."""
        judged = sum(s.accepted + (s.accepted < s.proposed) for s in self.steps)
        return sum(s.accepted for s in self.steps) / judged if judged else 0.0

    @property
    def tokens_per_step(self) -> float:
        return sum(len(s.emitted) for s in self.steps) / max(len(self.steps), 1)


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n context tokens."""

    name = "ngram"

    def __init__(self, n_max: int = 3):
        if n_max < 1:
            raise PerfmodelError(f"--ngram: {n_max} is not valid; allowed: an integer >= 1")
        self.n_max = n_max

    def start(self, prompt: list[int]) -> None:
        pass

    def propose(self, context: list[int], gamma: int, rng, params: SamplingParams):
        ctx = np.asarray(context, dtype=np.int64)
        L = len(ctx)
        for n in range(min(self.n_max, L - 1), 0, -1):
            tail = ctx[L - n:]
            # windows starting at 0..L-n-1 (the tail's own position excluded), latest first
            win = np.lib.stride_tricks.sliding_window_view(ctx[:L - 1], n)
            hits = np.flatnonzero((win == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                draft = ctx[start:start + gamma].tolist()
                return draft, [None] * len(draft)  # q: a point mass on each proposed token
        return [], []

    def rollback(self, accepted: int, new_token: int) -> None:
        pass


class NoDrafter:
    """Proposes nothing: every step is one plain decode step (the baseline, timed by the same loop as the
    speculative runs; `generate` also traces Python allocations, which would slow the baseline)."""

    name = "none"

    def start(self, prompt: list[int]) -> None:
        pass

    def propose(self, context, gamma, rng, params):
        return [], []

    def rollback(self, accepted: int, new_token: int) -> None:
        pass


class ModelDrafter:
    """A draft model with its own KV cache, sampled with the same parameters as the target."""

    name = "model"

    def __init__(self, model: Transformer, max_tokens: int):
        self.m, self.max_tokens = model, max_tokens
        self.forwards: list[Forward] = []
        self.step = 0

    def start(self, prompt: list[int]) -> None:
        self.cache = KVCache(self.m.be, self.m.spec, 1, self.max_tokens)
        self.forwards.clear()
        self.m.tr.phase, self.m.tr.step = "draft_prefill", 0
        self.m.forward(np.asarray([prompt[:-1]], dtype=np.int64), self.cache) if len(prompt) > 1 else None
        if len(prompt) > 1:
            self.forwards.append(Forward("draft", "draft_prefill", 0, len(prompt) - 1, 0, 1, sampled=False))
        self.pending = [prompt[-1]]  # tokens known but not yet in the draft's cache
        self.step = 0

    def propose(self, context: list[int], gamma: int, rng, params: SamplingParams):
        self.base = self.cache.length
        self.fed = len(self.pending)
        draft, qs = [], []
        feed = self.pending
        for _ in range(gamma):
            self.step += 1
            tr = self.m.tr
            tr.phase, tr.step = "draft", self.step
            past = self.cache.length
            lg = self.m.be.to_numpy(self.m.forward(np.asarray([feed], dtype=np.int64), self.cache)[:, -1, :])
            q = None if params.temperature == 0 else filtered_probs(lg, params)[0]
            tok = int(np.argmax(lg[0])) if q is None else _draw(q, rng)
            _record_sample(tr, lg, 1)
            self.forwards.append(Forward("draft", "draft", self.step, len(feed), past, 1))
            draft.append(tok)
            qs.append(q)
            feed = [tok]
        self.drafted = draft
        return draft, qs

    def rollback(self, accepted: int, new_token: int) -> None:
        g = len(self.drafted)
        if g == 0:
            self.pending = self.pending + [new_token]
            return
        fed_accepted = min(accepted, g - 1)  # accepted drafts already in the draft's cache
        self.cache.length = self.base + self.fed + fed_accepted
        _record_rollback(self.m.tr)
        self.forwards[-1].rollback = True
        self.pending = self.drafted[fed_accepted:accepted] + [new_token]


def _draw(p: np.ndarray, rng) -> int:
    return int(min(np.searchsorted(np.cumsum(p), rng.random(), side="right"), len(p) - 1))


def _record_sample(tr, lg: np.ndarray, rows: int) -> None:
    """The sampling pass over the logits rows, as plain generation records it."""
    ts = tr.start()
    tr.record(ts, "sample", "elementwise", -1, lg.size, act_read_bytes=lg.size * _logit_bytes(tr),
              act_write_bytes=rows * 8)


def _logit_bytes(tr) -> int:
    return getattr(tr, "logit_bytes", 4)


def _record_rollback(tr) -> None:
    ts = tr.start()
    tr.record(ts, "kv_rollback", "memory", -1, 0)


def speculative_generate(target: Transformer, drafter, prompt: list[int], max_new_tokens: int, gamma: int,
                         params: SamplingParams, eos_id: int | None = None) -> SpecGeneration:
    """Batch-1 speculative generation of max_new_tokens (fewer on EOS)."""
    draft_be = drafter.m.be if isinstance(drafter, ModelDrafter) else None
    if draft_be is not None and draft_be.name == "torch" and target.be.name == "numpy":
        # a torch draft between NumPy target passes: torch's OpenMP workers spin-wait after each operator and
        # take the two cores from OpenBLAS (measured: draft 51 ms/token alternating vs 21 ms alone); one
        # intra-op thread costs the batch-1 draft nothing
        torch = draft_be.torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _speculative(target, drafter, prompt, max_new_tokens, gamma, params, eos_id)
        finally:
            torch.set_num_threads(threads)
    return _speculative(target, drafter, prompt, max_new_tokens, gamma, params, eos_id)


def _speculative(target, drafter, prompt, max_new_tokens, gamma, params, eos_id) -> SpecGeneration:
    if gamma < 1:
        raise PerfmodelError(f"--gamma: {gamma} is not valid; allowed: an integer >= 1")
    if max_new_tokens < 1:
        raise PerfmodelError(f"--max-new-tokens: {max_new_tokens} is not valid; allowed: an integer >= 1")
    be, tr = target.be, target.tr
    tr.logit_bytes = be.nbytes(be.zeros((1,)))
    if isinstance(drafter, ModelDrafter):
        drafter.m.tr.logit_bytes = drafter.m.be.nbytes(drafter.m.be.zeros((1,)))
    rng = np.random.default_rng(params.seed)
    greedy = params.temperature == 0
    cache = KVCache(be, target.spec, 1, len(prompt) + max_new_tokens + gamma + 1)
    t0 = time.perf_counter()
    tr.phase, tr.step = "prefill", 0
    lg = be.to_numpy(target.forward(np.asarray([prompt], dtype=np.int64), cache)[:, -1, :])
    first = int(np.argmax(lg[0])) if greedy else _draw(filtered_probs(lg, params)[0], rng)
    _record_sample(tr, lg, 1)
    gen = SpecGeneration([first], 0.0)
    gen.forwards.append(Forward("target", "prefill", 0, len(prompt), 0, 1))
    drafter.start(list(prompt) + [first])
    gen.prefill_s = time.perf_counter() - t0
    context = list(prompt) + [first]
    step = 0
    while len(gen.tokens) < max_new_tokens and not (eos_id is not None and gen.tokens[-1] == eos_id):
        step += 1
        g = min(gamma, max_new_tokens - len(gen.tokens) - 1)  # no drafts past the last token wanted
        t1 = time.perf_counter()
        draft, qs = drafter.propose(context, g, rng, params)
        t2 = time.perf_counter()
        tr.phase, tr.step = "verify", step
        past = cache.length
        ids = np.asarray([[context[-1]] + draft], dtype=np.int64)
        lg = be.to_numpy(target.forward(ids, cache, all_logits=True)[0])  # [len(draft)+1, vocab]
        _record_sample(tr, lg, len(draft) + 1)
        gen.forwards.append(Forward("target", "verify", step, len(draft) + 1, past, len(draft) + 1, True))
        accepted, new = _verify(lg, draft, qs, params, rng, greedy)
        cache.length = past + 1 + accepted
        _record_rollback(tr)
        drafter.rollback(accepted, new)
        emitted = draft[:accepted] + [new]
        if eos_id is not None and eos_id in emitted:
            emitted = emitted[:emitted.index(eos_id) + 1]
        emitted = emitted[:max_new_tokens - len(gen.tokens)]
        gen.tokens += emitted
        context += emitted
        gen.steps.append(SpecStep(len(draft), accepted, emitted, t2 - t1, time.perf_counter() - t2))
    if isinstance(drafter, ModelDrafter):
        gen.forwards += drafter.forwards
    return gen


def _verify(lg: np.ndarray, draft: list[int], qs: list, params: SamplingParams, rng, greedy: bool):
    """(accepted drafts, the token after them): the correction at the first rejection, else the bonus."""
    if greedy:  # p and q one-hot: accept while the draft is the target's argmax
        best = lg.argmax(axis=-1)
        for i, d in enumerate(draft):
            if best[i] != d:
                return i, int(best[i])
        return len(draft), int(best[len(draft)])
    p = filtered_probs(lg, params)
    for i, d in enumerate(draft):
        q = qs[i]
        qd = 1.0 if q is None else q[d]
        if rng.random() < min(1.0, p[i, d] / qd):
            continue
        if q is None:  # residual of a point mass: p without d
            res = p[i].copy()
            res[d] = 0.0
        else:
            res = np.maximum(p[i] - q, 0.0)
        tot = res.sum()
        return i, _draw(res / tot, rng) if tot > 0 else int(np.argmax(p[i]))
    return len(draft), _draw(p[len(draft)], rng)
