"""The paged KV cache and the ragged runner: one engine forward per scheduler step."""

from __future__ import annotations

import numpy as np

from perfmodel.serving.scheduler import Scheduled


class PagedKV:
    """Per layer, K and V as [kv_heads, blocks * block_tokens, head_dim]: a token's slot is
    block * block_tokens + offset, the blocks coming from the sequence's block table."""

    def __init__(self, be, spec, num_blocks: int, block_tokens: int):
        shape = (spec.num_kv_heads, num_blocks * block_tokens, spec.head_dim)
        self.k = [be.zeros(shape) for _ in range(spec.num_layers)]
        self.v = [be.zeros(shape) for _ in range(spec.num_layers)]
        self.block_tokens = block_tokens
        self._be = be

    def nbytes(self) -> int:
        return sum(self._be.nbytes(t) for t in self.k + self.v)

    def slots(self, blocks: list[int], tokens: int) -> np.ndarray:
        pos = np.arange(tokens)
        return np.asarray(blocks, dtype=np.int64)[pos // self.block_tokens] * self.block_tokens + pos % self.block_tokens


class RaggedRunner:
    def __init__(self, model, num_blocks: int, block_tokens: int):
        self.model = model
        self.kv = PagedKV(model.be, model.spec, num_blocks, block_tokens)

    def inputs(self, plan: list[Scheduled]):
        """The step's token ids and (start, new, slots) per sequence (host work before the forward)."""
        ids = np.concatenate([np.asarray(s.seq.tokens[s.start:s.start + s.new], dtype=np.int64) for s in plan])
        seqs = [(s.start, s.new, self.kv.slots(s.seq.blocks, s.start + s.new)) for s in plan]
        return ids, seqs

    def forward(self, ids, seqs) -> np.ndarray:
        """Greedy next token of every sequence (sampling is part of the step, as the cost model counts it)."""
        logits = self.model.forward_ragged(ids, seqs, self.kv)
        be = self.model.be
        if be.name == "torch":
            return logits.argmax(dim=-1).cpu().numpy()
        return np.argmax(logits, axis=-1)
