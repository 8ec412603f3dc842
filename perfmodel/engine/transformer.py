"""The decoder-only transformer, written once for both backends (after gpt-fast's and nanoGPT's model code).

Covers the library's families at their true shapes: Llama (RMSNorm, RoPE, GQA/MQA, SwiGLU, tied or untied
head), Mixtral (router + top-k experts) and GPT-2 (LayerNorm, GELU, learned positions, biases). Every operator
is recorded under the cost model's name with FLOPs from the real shapes and bytes from the real tensors.

Two operator structures, the cost model's (perfmodel.costmodel.operators): `eager`, one operator per step of
the maths, and `fused`, the serving engines' fusions run as single operators: Q/K/V as one qkv_proj matmul over
concatenated weights, gate/up as one gate_up_proj with the activation applied to its output, each residual add
with the norm after it (add_norm), and with FlashAttention, RoPE and the KV-cache write inside the attention
operator. perfmodel.engine.compiled runs either structure under torch.compile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.operators import ATTN_BLOCK, FLOPS_PER_ELEMENT
from perfmodel.engine.tracer import Tracer
from perfmodel.errors import PerfmodelError
from perfmodel.specs.model import ModelSpec


def numel(x) -> int:
    return int(np.prod(tuple(x.shape), dtype=np.int64))


@dataclass
class LayerWeights:
    attn_norm: object
    q: object
    k: object
    v: object
    o: object
    mlp_norm: object
    gate: object = None
    up: object = None
    down: object = None
    attn_norm_b: object = None
    mlp_norm_b: object = None
    q_b: object = None
    k_b: object = None
    v_b: object = None
    o_b: object = None
    up_b: object = None
    down_b: object = None
    router: object = None
    experts: list | None = None  # [(gate, up, down)] per expert


@dataclass
class Weights:
    tok_emb: object  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: object
    final_norm_b: object = None
    lm_head: object = None  # [hidden, vocab]; None when tied to tok_emb
    pos_emb: object = None  # [max_position, hidden] for learned positions

    def map(self, f) -> "Weights":
        """Apply f to every array (e.g. move to a backend)."""
        def conv(x):
            if x is None:
                return None
            if isinstance(x, list):
                return [tuple(conv(t) for t in e) for e in x]
            return f(x)
        layers = [LayerWeights(**{k: conv(v) for k, v in vars(lw).items()}) for lw in self.layers]
        return Weights(conv(self.tok_emb), layers, conv(self.final_norm), conv(self.final_norm_b),
                       conv(self.lm_head), conv(self.pos_emb))


class KVCache:
    """Preallocated per-layer K and V: [batch, kv_heads, max_tokens, head_dim]."""

    def __init__(self, be, spec: ModelSpec, batch: int, max_tokens: int):
        shape = (batch, spec.num_kv_heads, max_tokens, spec.head_dim)
        self.k = [be.zeros(shape) for _ in range(spec.num_layers)]
        self.v = [be.zeros(shape) for _ in range(spec.num_layers)]
        self.length = 0
        self.max_tokens = max_tokens
        self._be = be

    def nbytes(self) -> int:
        """Real size of the allocated cache tensors."""
        return sum(self._be.nbytes(t) for t in self.k + self.v)

    def used_bytes(self) -> int:
        """Bytes of the filled part: what the formula 2*layers*kv_heads*head_dim*tokens*bytes describes."""
        per_token = sum(self._be.nbytes(t) for t in self.k + self.v) // self.max_tokens
        return per_token * self.length


@dataclass
class FusedLayer:
    """A layer's concatenated weights for the fused structure."""

    qkv: object
    qkv_b: object = None
    gate_up: object = None  # [h, 2f] (gated) or the up weight (plain MLP, activation fused in)
    experts: list | None = None  # [(gate_up [h, 2f], down)] per expert


STRUCTURES = ("eager", "fused")


class Transformer:
    def __init__(self, spec: ModelSpec, weights: Weights, backend, flash: bool = False,
                 tracer: Tracer | None = None, structure: str = "eager"):
        if spec.is_mla:
            raise PerfmodelError(f"model {spec.name}: the reference engine runs llama, mixtral and gpt2 families; "
                                 "MLA (deepseek) is modelled analytically only")
        if flash and backend.name != "torch":
            raise PerfmodelError("--flash: FlashAttention needs --backend torch (the numpy backend materialises scores)")
        if structure not in STRUCTURES:
            raise PerfmodelError(f"engine structure: {structure!r} is not valid; allowed: {'|'.join(STRUCTURES)}")
        self.spec, self.be, self.flash, self.structure = spec, backend, flash, structure
        self.fused = structure == "fused"
        # fold attention's 1/sqrt(head_dim) into the query projection (RoPE is linear, so this is exact):
        # the score kernel then needs no extra elementwise pass over Q
        scale = 1.0 / math.sqrt(spec.head_dim)
        weights = Weights(weights.tok_emb, [LayerWeights(**{**vars(lw), "q": lw.q * scale,
                                                            "q_b": None if lw.q_b is None else lw.q_b * scale})
                                            for lw in weights.layers],
                          weights.final_norm, weights.final_norm_b, weights.lm_head, weights.pos_emb)
        self.w = weights.map(backend.asarray)
        if backend.name == "numpy":
            # decode is one row times each weight: OpenBLAS streams a tall [in > out] weight faster stored
            # [out, in] (dot products of contiguous rows), a wide one faster as is; same values, same bytes
            for lw in self.w.layers:
                for name in ("q", "k", "v", "o", "gate", "up", "down"):
                    w = getattr(lw, name)
                    if w is not None and w.shape[0] > w.shape[1]:
                        setattr(lw, name, np.ascontiguousarray(w.T).T)
            if self.w.lm_head is None:
                # a contiguous [hidden, vocab] copy: BLAS streams it faster than the embedding's transposed view
                self.w.lm_head = np.ascontiguousarray(self.w.tok_emb.T)
        self.fw = [self._fuse_layer(lw) for lw in self.w.layers] if self.fused else None
        self.tr = tracer or Tracer(enabled=False)
        self.tr.sync = backend.sync
        if spec.positions == "rope":
            d = spec.head_dim
            inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
            ang = np.outer(np.arange(spec.max_position, dtype=np.float64), inv)
            ang = np.concatenate([ang, ang], axis=-1)
            self._cos, self._sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    # --- instrumented primitives -------------------------------------------------------------
    def _nb(self, *xs) -> int:
        return sum(self.be.nbytes(x) for x in xs if x is not None)

    def _linear(self, name, layer, x, w, b=None):
        t0 = self.tr.start()
        # as 2-D: BLAS then streams the weights in one gemm call (a stacked 3-D matmul is slower)
        y = self.be.matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])
        if b is not None:
            y = y + b
        self.tr.stop()
        if self.tr.enabled:
            rows, (k, n) = numel(x) // x.shape[-1], tuple(w.shape)
            self.tr.record(t0, name, "matmul", layer, 2 * rows * k * n + (rows * n if b is not None else 0),
                           weight_bytes=self._nb(w, b), act_read_bytes=self._nb(x), act_write_bytes=self._nb(y))
        return y

    def _norm(self, name, layer, x, w, b=None):
        t0 = self.tr.start()
        if self.spec.norm == "layernorm":
            y = self.be.layernorm(x, w, b, self.spec.norm_eps)
        else:
            y = x * self.be.rsqrt_mean_square(x, self.spec.norm_eps) * w
        self.tr.stop()
        if self.tr.enabled:
            self.tr.record(t0, name, "elementwise", layer, FLOPS_PER_ELEMENT[self.spec.norm] * numel(x),
                           weight_bytes=self._nb(w, b), act_read_bytes=self._nb(x), act_write_bytes=self._nb(y))
        return y

    def _add(self, name, layer, x, y):
        t0 = self.tr.start()
        z = x + y
        self.tr.stop()
        if self.tr.enabled:
            self.tr.record(t0, name, "elementwise", layer, numel(z), act_read_bytes=self._nb(x, y),
                           act_write_bytes=self._nb(z))
        return z

    def _fuse_layer(self, lw: LayerWeights) -> FusedLayer:
        be = self.be
        cat = lambda xs: be.asarray(np.concatenate([np.asarray(be.to_numpy(x)) for x in xs], axis=-1))  # noqa: E731
        qkv_b = cat([lw.q_b, lw.k_b, lw.v_b]) if lw.q_b is not None else None
        experts = [(cat([g, u]), d) for g, u, d in lw.experts] if lw.experts else None
        gate_up = cat([lw.gate, lw.up]) if lw.gate is not None else lw.up
        return FusedLayer(cat([lw.q, lw.k, lw.v]), qkv_b, gate_up, experts)

    def _add_norm(self, layer, x, y, w, b=None):
        """The residual add fused with the norm after it: one pass writes the sum and its normed value."""
        t0 = self.tr.start()
        z = x + y
        if self.spec.norm == "layernorm":
            h = self.be.layernorm(z, w, b, self.spec.norm_eps)
        else:
            h = z * self.be.rsqrt_mean_square(z, self.spec.norm_eps) * w
        self.tr.stop()
        if self.tr.enabled:
            self.tr.record(t0, "add_norm", "elementwise", layer,
                           (FLOPS_PER_ELEMENT[self.spec.norm] + FLOPS_PER_ELEMENT["add"]) * numel(z),
                           weight_bytes=self._nb(w, b), act_read_bytes=self._nb(x, y), act_write_bytes=self._nb(z, h))
        return z, h

    # --- forward ------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False, pad: np.ndarray | None = None):
        """ids [batch, new tokens] after cache.length cached ones; returns logits [batch, T', vocab] where T' is
        1 (the last position) unless all_logits. pad: left-padding per sequence, masked out of attention."""
        x, pos, mask, P = self._prologue(ids, cache, pad)
        T = ids.shape[1]
        x = self._layers(x, lambda i, lw, h: self._attention(i, lw, h, pos, cache, mask))
        cache.length = P + T
        if hasattr(cache, "after_forward"):  # compress what left the dense window (prefill attention stayed dense)
            cache.advance_queries(T)
            cache.after_forward()
        return self._epilogue(x, all_logits)

    def _layers(self, x, attend):
        """The decoder layers over hidden states x; attend(i, layer weights, normed h) is the attention block."""
        layers = self.w.layers
        if self.fused:  # later norms take the residual add before them along (add_norm)
            h = self._norm("attn_norm", 0, x, layers[0].attn_norm, layers[0].attn_norm_b)
        for i, lw in enumerate(layers):
            if not self.fused:
                h = self._norm("attn_norm", i, x, lw.attn_norm, lw.attn_norm_b)
            a = attend(i, lw, h)
            if self.fused:
                x, h = self._add_norm(i, x, a, lw.mlp_norm, lw.mlp_norm_b)
            else:
                x = self._add("attn_residual", i, x, a)
                h = self._norm("mlp_norm", i, x, lw.mlp_norm, lw.mlp_norm_b)
            m = self._moe(i, lw, h) if lw.router is not None else self._mlp(i, lw, h)
            if self.fused and i + 1 < len(layers):
                x, h = self._add_norm(i, x, m, layers[i + 1].attn_norm, layers[i + 1].attn_norm_b)
            else:
                x = self._add("mlp_residual", i, x, m)
        return x

    def forward_ragged(self, ids: np.ndarray, seqs: list, kv):
        """One forward over the new tokens of several sequences at once, each at its own length and position
        (ragged batching, no padding): the tokens are concatenated into one [1, total, hidden] pass, so every
        weight matmul streams its weights once for the whole step, and attention runs per sequence over that
        sequence's own cache. ids: the new tokens, sequence after sequence; seqs: (start, new, slots) per
        sequence: its first new token's position (tokens already cached), its number of new tokens, and the
        cache slot of each of its positions 0..start+new-1 (a paged cache: slots index kv.k[layer] / kv.v[layer],
        [kv_heads, slots, head_dim]). Returns logits [sequences, vocab] at each sequence's last new token."""
        be, s = self.be, self.spec
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] != sum(int(n) for _, n, _ in seqs) or not seqs:
            raise PerfmodelError("ragged forward: the new tokens do not add up to the sequences' counts")
        pos = np.concatenate([np.arange(int(p0), int(p0) + int(n)) for p0, n, _ in seqs])[None, :]
        if int(pos.max()) >= s.max_position:
            raise PerfmodelError(f"context: {int(pos.max()) + 1} tokens exceed {s.name}'s max_position {s.max_position}")
        x = self._embed(ids, pos)
        if s.positions == "rope":
            self._rope_tables = (be.asarray(self._cos[pos])[:, None, :, :], be.asarray(self._sin[pos])[:, None, :, :])
        plan, off = [], 0
        for p0, n, slots in seqs:  # per sequence: its rows of the step, its slots, its causal mask
            p0, n = int(p0), int(n)
            slots = np.asarray(slots, dtype=np.int64)[:p0 + n]
            if len(slots) != p0 + n:
                raise PerfmodelError("ragged forward: a sequence has fewer cache slots than positions")
            mask = self._mask(1, n, p0, np.zeros(1, dtype=np.int64))
            plan.append((off, n, p0, be.index_array(slots[p0:]), be.index_array(slots),
                         be_mask(be, mask) if self.flash else mask))
            off += n
        x = self._layers(x, lambda i, lw, h: self._ragged_attention(i, lw, h, plan, kv))
        last = be.index_array(np.array([o + n - 1 for o, n, *_ in plan]))
        x = be.take(x[0], last)[None]  # only each sequence's last new token needs logits
        return self._epilogue(x, all_logits=True)[0]

    def _ragged_attention(self, i, lw, h, plan, kv):
        be, s = self.be, self.spec
        _, T, _ = h.shape
        nq, nkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        if self.fused:
            fw = self.fw[i]
            qkv = self._linear("qkv_proj", i, h, fw.qkv, fw.qkv_b)
            split = lambda a, b, n: be.transpose(qkv[..., a * d:b * d].reshape(1, T, n, d), (0, 2, 1, 3))  # noqa
            q, k, v = split(0, nq, nq), split(nq, nq + nkv, nkv), split(nq + nkv, nq + 2 * nkv, nkv)
        else:
            q = be.transpose(self._linear("q_proj", i, h, lw.q, lw.q_b).reshape(1, T, nq, d), (0, 2, 1, 3))
            k = be.transpose(self._linear("k_proj", i, h, lw.k, lw.k_b).reshape(1, T, nkv, d), (0, 2, 1, 3))
            v = be.transpose(self._linear("v_proj", i, h, lw.v, lw.v_b).reshape(1, T, nkv, d), (0, 2, 1, 3))
        if s.positions == "rope":
            q, k = self._rope(i, q, k, None)
        outs = []
        kl, vl = kv.k[i], kv.v[i]
        for off, n, p0, new_slots, slots, mask in plan:
            kl[:, new_slots] = k[0, :, off:off + n]
            vl[:, new_slots] = v[0, :, off:off + n]
            qs, kc, vc = q[:, :, off:off + n], kl[:, slots][None], vl[:, slots][None]
            if self.flash:
                outs.append(be.sdpa(qs, kc, vc, mask, nkv != nq))  # q pre-scaled
            else:
                outs.append(self._blocked_attention(i, qs, kc, vc, mask, 0, p0, 0))
        out = outs[0] if len(outs) == 1 else be.concat(outs, 2)
        out = be.transpose(out, (0, 2, 1, 3)).reshape(1, T, nq * d)
        return self._linear("o_proj", i, out, lw.o, lw.o_b)

    def _prologue(self, ids, cache, pad=None):
        """Checks, positions, the embedded tokens, the attention mask and the rope tables of one forward."""
        be, s = self.be, self.spec
        B, T = ids.shape
        P = cache.length
        if P + T > cache.max_tokens:
            raise PerfmodelError(f"context: {P + T} tokens exceed the cache's {cache.max_tokens}")
        if P + T > s.max_position:
            raise PerfmodelError(f"context: {P + T} tokens exceed {s.name}'s max_position {s.max_position}")
        pad = np.zeros(B, dtype=np.int64) if pad is None else np.asarray(pad, dtype=np.int64)
        pos = np.maximum(P + np.arange(T)[None, :] - pad[:, None], 0)  # [B, T] positions per sequence
        x = self._embed(ids, pos)
        mask = self._mask(B, T, P, pad)
        if s.positions == "rope":  # gathered once per forward; every layer's rope still reads them
            self._rope_tables = (be.asarray(self._cos[pos])[:, None, :, :], be.asarray(self._sin[pos])[:, None, :, :])
        return x, pos, mask, P

    def _epilogue(self, x, all_logits: bool):
        if not all_logits:
            x = x[:, -1:, :]
        x = self._norm("final_norm", -1, x, self.w.final_norm, self.w.final_norm_b)
        head = self.w.lm_head if self.w.lm_head is not None else self.be.swap_last(self.w.tok_emb)
        return self._linear("lm_head", -1, x, head)

    def _embed(self, ids, pos):
        be = self.be
        t0 = self.tr.start()
        ids_a = be.index_array(ids)
        x = be.take(self.w.tok_emb, ids_a)
        weight = be.gather_nbytes(self.w.tok_emb, x)  # the gathered rows are what is read from the table
        flops = 0
        if self.w.pos_emb is not None:
            p = be.take(self.w.pos_emb, be.index_array(pos))
            weight += self._nb(p)
            x = x + p
            flops = numel(x)
        self.tr.stop()
        self.tr.record(t0, "embed", "memory", -1, flops, weight_bytes=weight, act_read_bytes=ids.size * 8,
                       act_write_bytes=self._nb(x))
        return x

    def _mask(self, B, T, P, pad):
        """[B, 1, T, P+T] bool: causal, sliding window, and not a left pad."""
        q = P + np.arange(T)[:, None]
        k = np.arange(P + T)[None, :]
        m = k <= q
        if self.spec.sliding_window:
            m &= k > q - self.spec.sliding_window
        # pads see no real key; letting each see itself keeps its (unused) softmax row finite
        m = m[None, :, :] & ((k[None, :, :] >= pad[:, None, None]) | (k == q)[None, :, :])
        return m[:, None, :, :]

    def _rope(self, layer, q, k, pos):
        be = self.be
        t0 = self.tr.start()
        cos, sin = self._rope_tables  # [B, 1, T, d]
        half = q.shape[-1] // 2

        def rot(x):
            return x * cos + be.concat([-x[..., half:], x[..., :half]], -1) * sin

        q2, k2 = rot(q), rot(k)
        self.tr.stop()
        self.tr.record(t0, "rope", "elementwise", layer, FLOPS_PER_ELEMENT["rope"] * (numel(q) + numel(k)),
                       act_read_bytes=self._nb(q, k, cos, sin), act_write_bytes=self._nb(q2, k2))
        return q2, k2

    def _attention(self, i, lw, h, pos, cache, mask):
        be, s, tr = self.be, self.spec, self.tr
        B, T, _ = h.shape
        nq, nkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        P = cache.length
        # under a sliding window only the band the new queries can see is read
        first = max(0, P - s.sliding_window + 1) if s.sliding_window else 0
        if self.fused:
            fw = self.fw[i]
            qkv = self._linear("qkv_proj", i, h, fw.qkv, fw.qkv_b)
            split = lambda a, b, n: be.transpose(qkv[..., a * d:b * d].reshape(B, T, n, d), (0, 2, 1, 3))  # noqa
            q, k, v = split(0, nq, nq), split(nq, nq + nkv, nkv), split(nq + nkv, nq + 2 * nkv, nkv)
            if self.flash and not hasattr(cache, "read"):
                out = self._fused_flash_attention(i, qkv, q, k, v, pos, cache, mask, P, first)
                return self._linear("o_proj", i, be.transpose(out, (0, 2, 1, 3)).reshape(B, T, nq * d), lw.o,
                                    lw.o_b)
        else:
            q = be.transpose(self._linear("q_proj", i, h, lw.q, lw.q_b).reshape(B, T, nq, d), (0, 2, 1, 3))
            k = be.transpose(self._linear("k_proj", i, h, lw.k, lw.k_b).reshape(B, T, nkv, d), (0, 2, 1, 3))
            v = be.transpose(self._linear("v_proj", i, h, lw.v, lw.v_b).reshape(B, T, nkv, d), (0, 2, 1, 3))
        if s.positions == "rope":
            q, k = self._rope(i, q, k, pos)
        t0 = tr.start()
        cache.k[i][:, :, P:P + T] = k
        cache.v[i][:, :, P:P + T] = v
        tr.stop()
        if tr.enabled:
            tr.record(t0, "kv_write", "memory", i, 0, act_read_bytes=self._nb(k, v),
                      kv_write_bytes=self._nb(cache.k[i][:, :, P:P + T], cache.v[i][:, :, P:P + T]))
        alive = None
        if hasattr(cache, "read"):  # a compressing cache: attention reads its storage back every step
            t0 = tr.start()
            kc, vc, alive, stored = cache.read(i, first, P + T)
            if stored:
                restored = 2 * B * nkv * min(cache.done - first, P + T - first) * d
                tr.stop()
                tr.record(t0, "kv_decompress", "memory", i, restored, kv_read_bytes=stored,
                          act_write_bytes=restored * kc.itemsize)
        else:
            kc, vc = cache.k[i][:, :, first:P + T], cache.v[i][:, :, first:P + T]
        mask = mask[..., first:]
        pairs = 0  # counted only when traced
        if tr.enabled and alive is None:  # (query, key) pairs the mask keeps, over all heads and sequences
            pairs = int(mask.sum()) * nq
        elif tr.enabled:  # evicted keys too are out of reach, per KV head
            pairs = int((mask & alive[:, :, None, :]).sum()) * (nq // nkv)
        if self.flash:
            t0 = tr.start()
            out = be.sdpa(q, kc, vc, be.torch.as_tensor(mask, device=be.device), nkv != nq)  # q pre-scaled
            tr.stop()
            tr.record(t0, "attention", "attention", i, pairs * (4 * d + FLOPS_PER_ELEMENT["softmax"]),
                      act_read_bytes=self._nb(q), kv_read_bytes=self._nb(kc, vc), act_write_bytes=self._nb(out))
        else:
            out = self._blocked_attention(i, q, kc, vc, mask, first, P, pairs, alive, cache)
            if hasattr(cache, "record_output"):
                cache.record_output(i, out)
        out = be.transpose(out, (0, 2, 1, 3)).reshape(B, T, nq * d)
        return self._linear("o_proj", i, out, lw.o, lw.o_b)

    def _fused_flash_attention(self, i, qkv, q, k, v, pos, cache, mask, P, first):
        """RoPE, the KV-cache write and FlashAttention as one operator: it reads the qkv output (and the rope
        tables) once and the cache only for the keys cached before this step; the new tokens' K/V enter from
        the qkv output, as in a fused kernel (here SDPA then reads them back from the cache slice it just wrote,
        a few bytes per decode step that stay in cache)."""
        be, s, tr = self.be, self.spec, self.tr
        nq, nkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        B, _, T, _ = q.shape
        t0 = tr.start()
        flops = 0
        if s.positions == "rope":
            cos, sin = self._rope_tables
            half = d // 2

            def rot(x):
                return x * cos + be.concat([-x[..., half:], x[..., :half]], -1) * sin

            q, k = rot(q), rot(k)
            flops = FLOPS_PER_ELEMENT["rope"] * (numel(q) + numel(k))
        cache.k[i][:, :, P:P + T] = k
        cache.v[i][:, :, P:P + T] = v
        kc, vc = cache.k[i][:, :, first:P + T], cache.v[i][:, :, first:P + T]
        m = mask[..., first:]
        out = be.sdpa(q, kc, vc, be.torch.as_tensor(m, device=be.device), nkv != nq)
        tr.stop()
        if tr.enabled:
            pairs = int(m.sum()) * nq
            tables = self._nb(*self._rope_tables) if s.positions == "rope" else 0
            tr.record(t0, "attention", "attention", i, flops + pairs * (4 * d + FLOPS_PER_ELEMENT["softmax"]),
                      act_read_bytes=self._nb(qkv) + tables,
                      kv_read_bytes=self._nb(cache.k[i][:, :, first:P], cache.v[i][:, :, first:P]),
                      kv_write_bytes=self._nb(cache.k[i][:, :, P:P + T], cache.v[i][:, :, P:P + T]),
                      act_write_bytes=self._nb(out))
        return out

    def _blocked_attention(self, i, q, kc, vc, mask, first, P, pairs, alive=None, cache=None):
        """Causal attention with the scores materialised, a block of ATTN_BLOCK query rows at a time: each
        block sees only keys up to its last row (and within the window), so the upper triangle is skipped."""
        be, s, tr = self.be, self.spec, self.tr
        B, nq, T, d = q.shape
        nkv = kc.shape[1]
        g = nq // nkv
        qg = q.reshape(B, nkv, g, T, d)  # each KV head serves g query heads and is read once per block
        t_qk = t_sm = t_av = 0.0
        n_read_q = n_read_k = n_read_v = n_scores = 0
        outs = []
        for r0 in range(0, T, ATTN_BLOCK):
            r1 = min(T, r0 + ATTN_BLOCK)
            lo = max(0, P + r0 - s.sliding_window + 1) - first if s.sliding_window else 0
            hi = P + r1 - first
            qb, kb, vb = qg[:, :, :, r0:r1], kc[:, :, lo:hi], vc[:, :, lo:hi]
            t0 = tr.start()
            scores = be.matmul(qb, be.swap_last(kb)[:, :, None])
            t1 = tr.start()
            mb = mask[:, :, None, r0:r1, lo:hi]
            if alive is not None:  # evicted tokens (H2O, StreamingLLM) are out of every query's reach
                mb = mb & alive[:, :, None, None, lo:hi]
            probs = be.masked_softmax(scores, be_mask(be, mb))
            if cache is not None and hasattr(cache, "observe"):
                cache.observe(i, q[:, :, r0:r1], probs, first + lo)
            t2 = tr.start()
            outs.append(be.matmul(probs, vb[:, :, None]))
            t3 = tr.start()
            t_qk, t_sm, t_av = t_qk + t1 - t0, t_sm + t2 - t1, t_av + t3 - t2
            n_read_q += self._nb(qb)
            n_read_k += self._nb(kb)
            n_read_v += self._nb(vb)
            n_scores += self._nb(scores)
        out = outs[0] if len(outs) == 1 else be.concat(outs, 3)
        now = tr.start()
        tr.record(now - t_qk, "qk", "attention", i, pairs * 2 * d, act_read_bytes=n_read_q, kv_read_bytes=n_read_k,
                  act_write_bytes=n_scores)
        tr.record(now - t_sm, "softmax", "elementwise", i, pairs * FLOPS_PER_ELEMENT["softmax"],
                  act_read_bytes=n_scores, act_write_bytes=n_scores)
        tr.record(now - t_av, "av", "attention", i, pairs * 2 * d, act_read_bytes=n_scores, kv_read_bytes=n_read_v,
                  act_write_bytes=self._nb(out))
        return out.reshape(B, nq, T, d)

    def _mlp(self, i, lw, h, prefix=""):
        be, tr = self.be, self.tr
        if self.fused:
            return self._linear(f"{prefix}down_proj", i, self._gate_up(i, h, self.fw[i].gate_up,
                                                                       None if self.spec.gated_mlp else lw.up_b,
                                                                       prefix), lw.down, lw.down_b)
        if self.spec.gated_mlp:
            g = self._linear(f"{prefix}gate_proj", i, h, lw.gate)
            u = self._linear(f"{prefix}up_proj", i, h, lw.up)
            t0 = tr.start()
            act = be.silu(g) if self.spec.activation == "silu" else be.gelu(g)
            y = act * u
            kind = "silu_mul" if self.spec.activation == "silu" else "gelu_mul"
            tr.stop()
            tr.record(t0, f"{prefix}act_mul", "elementwise", i, FLOPS_PER_ELEMENT[kind] * numel(y),
                      act_read_bytes=self._nb(g, u), act_write_bytes=self._nb(y))
            return self._linear(f"{prefix}down_proj", i, y, lw.down)
        u = self._linear(f"{prefix}up_proj", i, h, lw.up, lw.up_b)
        t0 = tr.start()
        y = be.gelu(u)
        tr.stop()
        tr.record(t0, f"{prefix}act", "elementwise", i, FLOPS_PER_ELEMENT["gelu"] * numel(y),
                  act_read_bytes=self._nb(u), act_write_bytes=self._nb(y))
        return self._linear(f"{prefix}down_proj", i, y, lw.down, lw.down_b)

    def _gate_up(self, i, h, w, b=None, prefix="", name=None):
        """gate_up_proj: one matmul over [gate | up] with act(gate) * up applied to its output (up_act_proj:
        a plain MLP's up matmul with its GELU)."""
        be, tr, s = self.be, self.tr, self.spec
        t0 = tr.start()
        y = be.matmul(h.reshape(-1, h.shape[-1]), w)
        if b is not None:
            y = y + b
        if s.gated_mlp:
            f = w.shape[-1] // 2
            g = y[:, :f]
            out = (be.silu(g) if s.activation == "silu" else be.gelu(g)) * y[:, f:]
            act = "silu_mul" if s.activation == "silu" else "gelu_mul"
            name = name or f"{prefix}gate_up_proj"
        else:
            f, act = w.shape[-1], "gelu"
            out = be.gelu(y)
            name = name or f"{prefix}up_act_proj"
        tr.stop()
        if tr.enabled:
            rows = numel(h) // h.shape[-1]
            tr.record(t0, name, "matmul", i, 2 * rows * h.shape[-1] * w.shape[-1] + (rows * f if b is not None else 0)
                      + FLOPS_PER_ELEMENT[act] * rows * f, weight_bytes=self._nb(w, b), act_read_bytes=self._nb(h),
                      act_write_bytes=self._nb(out))
        return out.reshape(*h.shape[:-1], f)

    def _moe(self, i, lw, h):
        """Mixtral-style: softmax over the top-k router logits, each token through its k experts."""
        be, tr, s = self.be, self.tr, self.spec
        B, T, hd = h.shape
        x = h.reshape(B * T, hd)
        logits = self._linear("router", i, x, lw.router)
        k = s.experts_per_token
        t0 = tr.start()
        top, idx = be.topk(logits, k)
        gate_w = be.softmax(top)
        tr.stop()
        tr.record(t0, "router_topk", "elementwise", i, FLOPS_PER_ELEMENT["softmax"] * numel(logits),
                  act_read_bytes=self._nb(logits), act_write_bytes=self._nb(gate_w) + numel(idx) * 8)
        idx_np = np.asarray(be.to_numpy(idx) if be.name == "torch" else idx).astype(np.int64)
        flat = idx_np.reshape(-1)  # assignment a = token * k + slot
        order = np.argsort(flat, kind="stable")
        experts = np.unique(flat)
        self.tr.experts_touched.append(len(experts))
        groups = [(e, order[flat[order] == e]) for e in experts]
        xs = [be.take(x, be.index_array(a // k)) for _, a in groups]

        def per_expert(name, fn, inputs, wsel, kind="matmul"):
            t0 = tr.start()
            outs = [fn(e, *ins) for (e, _), ins in zip(groups, inputs)]
            flops = sum(2 * numel(ins[0]) * (lw.experts[e][wsel].shape[-1]) for (e, _), ins in zip(groups, inputs))
            tr.stop()
            tr.record(t0, name, kind, i, flops, weight_bytes=sum(self._nb(lw.experts[e][wsel]) for e, _ in groups),
                      act_read_bytes=sum(self._nb(*ins) for ins in inputs), act_write_bytes=self._nb(*outs))
            return outs

        if self.fused:  # each expert's [gate | up] matmul with the activation on its output, one operator
            t0 = tr.start()
            enabled, tr.enabled = tr.enabled, False
            gus = [self.fw[i].experts[e][0] for e, _ in groups]
            ys = [self._gate_up(i, a, gu) for a, gu in zip(xs, gus)]
            tr.enabled = enabled
            f = s.moe_intermediate_size
            tr.stop()
            tr.record(t0, "expert_gate_up", "matmul", i, sum(numel(a) * 2 * 2 * f + FLOPS_PER_ELEMENT["silu_mul"]
                                                             * numel(y) for a, y in zip(xs, ys)),
                      weight_bytes=self._nb(*gus), act_read_bytes=self._nb(*xs), act_write_bytes=self._nb(*ys))
        else:
            gs = per_expert("expert_gate", lambda e, a: be.matmul(a, lw.experts[e][0]), [(a,) for a in xs], 0)
            us = per_expert("expert_up", lambda e, a: be.matmul(a, lw.experts[e][1]), [(a,) for a in xs], 1)
            t0 = tr.start()
            ys = [be.silu(g) * u for g, u in zip(gs, us)]
            tr.stop()
            tr.record(t0, "expert_act_mul", "elementwise", i,
                      FLOPS_PER_ELEMENT["silu_mul"] * sum(numel(y) for y in ys),
                      act_read_bytes=self._nb(*gs, *us), act_write_bytes=self._nb(*ys))
        ds = per_expert("expert_down", lambda e, a: be.matmul(a, lw.experts[e][2]), [(y,) for y in ys], 2)
        t0 = tr.start()
        out = be.zeros((B * T, hd))
        w_flat = gate_w.reshape(-1)
        for (_, a), dn in zip(groups, ds):
            sel = be.index_array(a)
            scaled = dn * be.take(w_flat, sel)[:, None]
            out = index_add(be, out, be.index_array(a // k), scaled)
        routed = len(flat)
        tr.stop()
        tr.record(t0, "moe_combine", "elementwise", i, 2 * routed * hd,
                  act_read_bytes=self._nb(*ds) + routed * self._nb(w_flat) // max(numel(w_flat), 1),
                  act_write_bytes=self._nb(out))
        return out.reshape(B, T, hd)


def be_mask(be, mask):
    return mask if be.name == "numpy" else be.torch.as_tensor(mask, device=be.device)


def index_add(be, out, rows, vals):
    if be.name == "numpy":
        np.add.at(out, rows, vals)
        return out
    return out.index_add(0, rows, vals)
