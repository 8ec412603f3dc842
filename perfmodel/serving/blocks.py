"""The paged KV block pool, with prefix caching (after vLLM's block manager).

Blocks hold `block_tokens` tokens of one sequence's K/V. A block is owned by the sequences that reference it
(refcount); a block whose refcount drops to zero goes to the tail of the free queue but keeps its contents and
its hash, so a later request with the same prefix can take it back (a hit) until the pool reuses it for
something else (allocation takes from the head: the least recently freed block is evicted first).

A full block's hash is the hash of (its parent block's hash, its tokens): equal hashes mean an equal token
prefix up to the end of the block, so a hit is valid for every sequence whose prompt starts with those tokens.
"""

from __future__ import annotations

from collections import OrderedDict

from perfmodel.errors import PerfmodelError


def block_hashes(tokens, block_tokens: int, full_blocks: int, known: list[int] | None = None) -> list[int]:
    """Chained hashes of the first full_blocks blocks of tokens (extending `known`, the first ones' hashes)."""
    out = list(known or [])
    parent = out[-1] if out else None
    for b in range(len(out), full_blocks):
        parent = hash((parent, tuple(tokens[b * block_tokens:(b + 1) * block_tokens])))
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, block_tokens: int = 16, prefix_cache: bool = False):
        if num_blocks < 1 or block_tokens < 1:
            raise PerfmodelError(f"--kv-blocks: must be an integer >= 1, got {num_blocks}")
        self.num_blocks, self.block_tokens, self.prefix_cache = num_blocks, block_tokens, prefix_cache
        self.ref = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}  # block -> hash (full, computed blocks only)
        self.cached: dict[int, int] = {}  # hash -> block
        self.evictions = 0

    @property
    def free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (refcount 1), evicting the least recently freed cached blocks; the caller checks
        `free` first."""
        if n > self.free:
            raise PerfmodelError(f"KV pool: {n} blocks asked, {self.free} free")
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None:
                del self.cached[h]
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (their cached contents kept).
        Released in reverse so a sequence's last blocks are evicted before its prefix."""
        for b in reversed(blocks):
            if self.ref[b] <= 0:
                raise PerfmodelError(f"KV pool: block {b} released with no reference")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None

    def lookup(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of hashes; each taken (refcount + 1, out of the free queue)."""
        if not self.prefix_cache:
            return []
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        for b in out:
            if self.ref[b] == 0:
                del self.free_queue[b]
            self.ref[b] += 1
        return out

    def hits_available(self, hashes: list[int]) -> tuple[int, int]:
        """(cached prefix blocks, of which currently free) without taking them: admission's arithmetic."""
        if not self.prefix_cache:
            return 0, 0
        n = free = 0
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            n += 1
            free += self.ref[b] == 0
        return n, free

    def register(self, block: int, h: int) -> None:
        """A full block's contents are computed: make it findable (the first block with a hash keeps it)."""
        if not self.prefix_cache or block in self.hash_of or h in self.cached:
            return
        self.hash_of[block] = h
        self.cached[h] = block

    def check(self, owners: dict[int, list[int]]) -> None:
        """Invariants against the sequences' block tables (owner id -> blocks): a block's refcount equals the
        number of sequences holding it, a block is free iff unreferenced, and a block held by two sequences is
        a cached (hashed) prefix block, never a private one booked twice."""
        count = [0] * self.num_blocks
        for blocks in owners.values():
            if len(set(blocks)) != len(blocks):
                raise AssertionError(f"a sequence holds a block twice: {blocks}")
            for b in blocks:
                count[b] += 1
        for b in range(self.num_blocks):
            if count[b] != self.ref[b]:
                raise AssertionError(f"block {b}: refcount {self.ref[b]}, held by {count[b]} sequences")
            if (b in self.free_queue) != (self.ref[b] == 0):
                raise AssertionError(f"block {b}: refcount {self.ref[b]} but free={b in self.free_queue}")
            if count[b] > 1 and b not in self.hash_of:
                raise AssertionError(f"block {b}: double-booked (held by {count[b]} sequences, not a cached block)")
        if any(self.cached[h] != b for b, h in self.hash_of.items()) or len(self.cached) != len(self.hash_of):
            raise AssertionError("prefix cache index inconsistent")
