"""Iteration-level scheduling over a paged KV block pool (the policy perfmodel.planning.simulate models).

Every step: admit waiting sequences first-come-first-served while the batch has room and the pool has the
blocks for every token they hold (prompt, plus what they generated before a preemption), less the prefix
blocks the cache already holds; then schedule, in running order, each prefilling sequence's next chunk (under
the chunked-prefill token budget) and one token of every decoding sequence. After the forward: a sequence
whose chunk reached its last token gets one new token (the first one from its prefill); finished sequences
free their blocks; every running sequence gets the blocks its next step writes into, and when the pool has
none, the newest running sequence is preempted: its blocks freed and its tokens (prompt + generated) queued
to be recomputed at the front of the waiting queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from perfmodel.errors import PerfmodelError
from perfmodel.serving.blocks import BlockPool, block_hashes


@dataclass
class Sequence:
    rid: int
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    out_len: int
    arrival_s: float = 0.0
    computed: int = 0  # tokens whose K/V is in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks registered so far
    preemptions: int = 0
    finished: bool = False
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Scheduled:
    seq: Sequence
    start: int  # first new token's position
    new: int  # new tokens this step
    decode: bool  # one token of a sequence already generating (else a prefill chunk or a recompute)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token: the step yields its next token."""
        return self.start + self.new == len(self.seq.tokens)


@dataclass
class SchedulerStats:
    admissions: int = 0
    prompt_tokens: int = 0  # tokens to compute at admission (recomputes included)
    hit_tokens: int = 0  # of those, found in the prefix cache
    preemptions: int = 0
    finished: int = 0


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int = 256, chunked_prefill: int = 0):
        self.pool, self.max_batch, self.chunk = pool, max_batch, chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_tokens)

    def add(self, seq: Sequence) -> None:
        if self.blocks_for(seq.prompt_len + seq.out_len) > self.pool.num_blocks:
            raise PerfmodelError(f"--kv-blocks: request {seq.rid} needs {self.blocks_for(seq.prompt_len + seq.out_len)}"
                                 f" blocks of {self.pool.block_tokens} tokens, the pool has {self.pool.num_blocks}")
        self.waiting.append(seq)

    def _hashes(self, seq: Sequence) -> list[int]:
        # a hit never covers the last token: its logits must be computed to sample the next one
        return block_hashes(seq.tokens, self.pool.block_tokens, (len(seq.tokens) - 1) // self.pool.block_tokens)

    def _admit(self) -> None:
        pool = self.pool
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            hashes = self._hashes(seq) if pool.prefix_cache else []
            hits, hits_free = pool.hits_available(hashes)
            fresh = self.blocks_for(len(seq.tokens)) - hits
            if fresh + hits_free > pool.free:
                break
            self.waiting.popleft()
            seq.blocks = pool.lookup(hashes[:hits]) + pool.allocate(fresh)
            seq.hashes = hashes[:hits]
            seq.computed = hits * pool.block_tokens
            self.stats.admissions += 1
            self.stats.prompt_tokens += len(seq.tokens)
            self.stats.hit_tokens += seq.computed
            self.running.append(seq)

    def schedule(self) -> list[Scheduled]:
        """Admit, then the step's work: (sequence, start, new tokens) in running order."""
        self._admit()
        budget = self.chunk or 1 << 62
        plan = []
        for seq in self.running:
            left = len(seq.tokens) - seq.computed
            decode = left == 1 and seq.generated > 0 and seq.computed > 0
            if decode:
                plan.append(Scheduled(seq, seq.computed, 1, True))
            elif budget > 0:
                n = min(left, budget)
                budget -= n
                plan.append(Scheduled(seq, seq.computed, n, False))
        return plan

    def update(self, plan: list[Scheduled], next_tokens: list[int | None], now: float) -> list[Sequence]:
        """After the forward: next_tokens[i] is the token sampled for plan[i] (None where it samples none).
        Returns the sequences that finished."""
        pool = self.pool
        for s, tok in zip(plan, next_tokens):
            seq = s.seq
            seq.computed = s.start + s.new
            if pool.prefix_cache:  # full blocks now computed become findable
                old = len(seq.hashes)
                seq.hashes = block_hashes(seq.tokens, pool.block_tokens, seq.computed // pool.block_tokens,
                                          seq.hashes)
                for b in range(old, len(seq.hashes)):
                    pool.register(seq.blocks[b], seq.hashes[b])
            if s.samples:
                if tok is None:
                    raise PerfmodelError("scheduler: a sampling chunk got no token")
                seq.tokens.append(int(tok))
                seq.token_times.append(now)
                if seq.first_token_s is None:
                    seq.first_token_s = now
        done = []
        still = []
        for seq in self.running:
            if seq.generated >= seq.out_len and seq.computed == len(seq.tokens) - 1:
                seq.finished = True
                pool.release(seq.blocks)
                seq.blocks = []
                self.stats.finished += 1
                done.append(seq)
            else:
                still.append(seq)
        self.running = still
        for seq in list(self.running):  # the blocks each sequence's next step writes into
            if seq not in self.running:
                continue
            need = self.blocks_for(len(seq.tokens)) - len(seq.blocks)
            while need > pool.free:
                victim = self.running.pop()  # the newest; this sequence itself last
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running and need > 0:
                seq.blocks += pool.allocate(need)
        return done

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.hashes, seq.computed = [], [], 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def owners(self) -> dict[int, list[int]]:
        return {s.rid: s.blocks for s in self.running}
