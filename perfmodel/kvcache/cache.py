"""A KV cache that compresses tokens as they leave the dense window, and that attention reads through.

Pruning (per-token / per-channel) keeps each old token's (or channel group's) most important elements in the
bitmap tile format; KIVI stores old tokens as packed 2/4-bit codes with fp16 scales and zero points; H2O and
StreamingLLM evict whole tokens (masked out of attention). The dense buffers the base class allocates stay as
scratch; the cache's size is what `stored_bytes()` measures: the arrays that hold the compressed history plus
the dense window.
"""

from __future__ import annotations

import numpy as np

from perfmodel.engine.transformer import KVCache
from perfmodel.kvcache import bitmap
from perfmodel.kvcache.methods import KVMethod

SCALE_BYTES = 2  # fp16 scales and zero points


class CompressedKVCache(KVCache):
    def __init__(self, be, spec, batch: int, max_tokens: int, method: KVMethod):
        if be.name != "numpy":
            from perfmodel.errors import PerfmodelError
            raise PerfmodelError("KV compression runs on the numpy backend")
        if method.kind in ("per-token", "per-channel") and spec.head_dim % bitmap.TILE:
            from perfmodel.errors import PerfmodelError
            raise PerfmodelError(f"--kv-prune: pruning tiles are {bitmap.TILE} channels of one token; head_dim "
                                 f"{spec.head_dim} of {spec.name} is not a multiple of {bitmap.TILE}")
        super().__init__(be, spec, batch, max_tokens)
        self.method = method
        L, B, nkv, d = spec.num_layers, batch, spec.num_kv_heads, spec.head_dim
        self.d, self.nkv, self.B = d, nkv, B
        self.done = 0  # tokens [0, done) have left the window and been compressed / considered
        self.ck = [bitmap.BitmapTiles.empty(np.float32) for _ in range(L)]
        self.cv = [bitmap.BitmapTiles.empty(np.float32) for _ in range(L)]
        self.quant: list[dict] = [{} for _ in range(L)]  # kivi: packed codes + scales per stream
        self.alive = np.ones((B, nkv, max_tokens), dtype=bool)  # h2o / streaming evictions
        w = method.window
        self.q_ring = np.zeros((L, max(w, 1), B, nkv, d), dtype=np.float32)  # |q| of the last `window` queries
        self.q_pos = 0
        self.attn_acc = np.zeros((L, B, nkv, max_tokens), dtype=np.float32)  # attention each token received
        self.dense_view: list = [None] * L  # [B, nkv, done, d] K/V reconstructed from storage
        self.vdense_view: list = [None] * L

    capture: list | None = None  # set to [] to record each layer's attention output per forward

    def record_output(self, layer: int, out) -> None:
        if self.capture is not None:
            self.capture.append(np.array(out, copy=True))

    # --- hooks the transformer calls ------------------------------------------------------------
    def observe(self, layer: int, q, probs, key_start: int) -> None:
        """Queries [B, nq, T, d] and attention weights [B, nkv, g, T, keys] (keys from key_start)."""
        B, nq, T, d = q.shape
        g = nq // self.nkv
        absq = np.abs(q).reshape(B, self.nkv, g, T, d).sum(axis=2)  # [B, nkv, T, d]
        w = max(self.method.window, 1)
        for t in range(max(0, T - w), T):
            self.q_ring[layer, (self.q_pos + t) % w] = absq[:, :, t]
        keys = probs.shape[-1]
        self.attn_acc[layer, :, :, key_start:key_start + keys] += probs.sum(axis=(2, 3))

    def advance_queries(self, T: int) -> None:
        self.q_pos += T

    def read(self, layer: int, first: int, end: int):
        """K, V [B, nkv, end-first, d] as attention sees them, and the alive mask [B, nkv, keys] or None."""
        k, v = self.k[layer][:, :, first:end], self.v[layer][:, :, first:end]
        if self.done and self.method.kind in ("per-token", "per-channel", "kivi"):
            k, v = k.copy(), v.copy()
            n = min(self.done, end) - first
            if n > 0:
                k[:, :, :n] = self.dense_view[layer][:, :, first:first + n]
                v[:, :, :n] = self.vdense_view[layer][:, :, first:first + n]
        alive = None
        if self.method.kind in ("h2o", "streaming"):
            alive = self.alive[:, :, first:end]
        return k, v, alive

    # --- compression as tokens leave the window -------------------------------------------------
    def after_forward(self) -> None:
        m = self.method
        if m.kind == "dense":
            return
        old = self.length - m.window  # tokens that have left the dense window
        if m.kind == "per-channel" or m.kind == "kivi":
            unit = bitmap.TILE if m.kind == "per-channel" else m.group
            old = (old // unit) * unit  # whole groups of tokens only
        if old <= self.done:
            return
        for i in range(len(self.k)):
            self._compress_layer(i, self.done, old)
        self.done = old

    def _compress_layer(self, i: int, lo: int, hi: int) -> None:
        m = self.method
        kseg, vseg = self.k[i][:, :, lo:hi], self.v[i][:, :, lo:hi]  # [B, nkv, n, d]
        if m.kind in ("h2o", "streaming"):
            self._evict(i, hi)
            return
        if m.kind == "kivi":
            kq, kd = _kivi(kseg, m.bits, m.group, axis="channel")
            vq, vd = _kivi(vseg, m.bits, m.group, axis="token")
            q = self.quant[i]
            for name, part in (("k", kq), ("v", vq)):
                for key, arr in part.items():
                    q[f"{name}_{key}"] = np.concatenate([q[f"{name}_{key}"], arr]) if f"{name}_{key}" in q else arr
            self._append_view(i, kd, vd)
            return
        qsum = self.q_ring[i].sum(axis=0)  # [B, nkv, d]
        att = self.attn_acc[i][:, :, lo:hi]  # [B, nkv, n]
        kscore = np.abs(kseg) * (qsum[:, :, None, :] if m.score == "output" else 1.0)
        vscore = np.abs(vseg) * (att[..., None] if m.score == "output" else 1.0)
        ktiles, kdense = _prune(kseg, kscore, m.k_sparsity, m.kind)
        vtiles, vdense = _prune(vseg, vscore, m.v_sparsity, m.kind)
        self.ck[i] = bitmap.concat(self.ck[i], ktiles)
        self.cv[i] = bitmap.concat(self.cv[i], vtiles)
        self._append_view(i, kdense, vdense)

    def _append_view(self, i, kd, vd):
        self.dense_view[i] = kd if self.dense_view[i] is None else np.concatenate([self.dense_view[i], kd], axis=2)
        self.vdense_view[i] = vd if self.vdense_view[i] is None else np.concatenate([self.vdense_view[i], vd], axis=2)

    def _evict(self, i: int, hi: int) -> None:
        """Keep (1-s) of the tokens that left the window: heavy hitters (H2O) or the first sinks (StreamingLLM)."""
        if i != 0:
            return  # one decision for all layers: shared alive mask per (sequence, KV head)
        m = self.method
        budget = int(round((1 - m.k_sparsity) * hi))
        self.alive[:, :, :hi] = False
        if m.kind == "streaming":
            keep = list(range(min(m.sinks, budget))) + list(range(max(m.sinks, hi - max(budget - m.sinks, 0)), hi))
            self.alive[:, :, keep] = True
            return
        score = self.attn_acc[:, :, :, :hi].sum(axis=0)  # over layers: [B, nkv, hi]
        top = np.argsort(-score, axis=-1, kind="stable")[..., :budget]
        np.put_along_axis(self.alive[:, :, :hi], top, True, axis=-1)

    # --- what it occupies ---------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes of the arrays that hold the cache: compressed history + dense window (+ kept tokens)."""
        m, vb = self.method, np.dtype(np.float32).itemsize
        per_token_dense = 2 * self.B * self.nkv * self.d * vb  # K and V of one token, all sequences
        layers = len(self.k)
        if m.kind == "dense":
            return layers * self.length * per_token_dense
        window = (self.length - self.done) * per_token_dense * layers
        if m.kind in ("per-token", "per-channel"):
            return window + sum(t.nbytes for t in self.ck + self.cv)
        if m.kind == "kivi":
            return window + sum(a.nbytes for q in self.quant for a in q.values())
        kept = int(self.alive[:, :, :self.done].sum())  # per (sequence, head) token: K+V rows + an int32 index
        return window + layers * kept * (2 * self.d * vb + 4)


def _prune(seg: np.ndarray, score: np.ndarray, sparsity: float, kind: str):
    """Keep the top elements of every 64-element tile: per-token tiles run along channels, per-channel tiles
    along 64 tokens of one channel. Returns the tile format and the dense view with zeros where pruned."""
    B, H, n, d = seg.shape
    if kind == "per-token":
        tiles, sc = seg.reshape(-1, bitmap.TILE), score.reshape(-1, bitmap.TILE)
    else:  # [B, H, n/64, 64, d] -> channel-major tiles of 64 tokens
        tiles = seg.reshape(B, H, n // bitmap.TILE, bitmap.TILE, d).transpose(0, 1, 2, 4, 3).reshape(-1, bitmap.TILE)
        sc = score.reshape(B, H, n // bitmap.TILE, bitmap.TILE, d).transpose(0, 1, 2, 4, 3).reshape(-1, bitmap.TILE)
    kept = bitmap.kept_per_tile(sparsity)
    idx = np.argpartition(-sc, kept - 1, axis=1)[:, :kept]
    keep = np.zeros(tiles.shape, dtype=bool)
    np.put_along_axis(keep, idx, True, axis=1)
    t = bitmap.compress(np.ascontiguousarray(tiles), keep)
    dense = np.where(keep, tiles, 0)
    if kind == "per-token":
        dense = dense.reshape(B, H, n, d)
    else:
        dense = dense.reshape(B, H, n // bitmap.TILE, d, bitmap.TILE).transpose(0, 1, 2, 4, 3).reshape(B, H, n, d)
    return t, dense.astype(seg.dtype)


def _kivi(seg: np.ndarray, bits: int, group: int, axis: str):
    """Asymmetric uniform quantisation in groups of `group` (K per channel over tokens, V per token over
    channels); codes packed 8/bits to a byte, fp16 scale and zero point per group."""
    B, H, n, d = seg.shape
    if axis == "channel":
        g = seg.reshape(B, H, n // group, group, d).transpose(0, 1, 2, 4, 3).reshape(-1, group)
    else:
        g = seg.reshape(-1, group)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    levels = 2 ** bits - 1
    scale = np.maximum(hi - lo, 1e-8) / levels
    codes = np.clip(np.rint((g - lo) / scale), 0, levels).astype(np.uint8)
    per_byte = 8 // bits
    flat = codes.reshape(-1, per_byte)
    packed = np.zeros(flat.shape[0], dtype=np.uint8)
    for j in range(per_byte):
        packed |= (flat[:, j] << (bits * j)).astype(np.uint8)
    scale16, lo16 = scale.astype(np.float16), lo.astype(np.float16)
    deq = (codes * scale16.astype(np.float32) + lo16.astype(np.float32)).astype(seg.dtype)
    if axis == "channel":
        deq = deq.reshape(B, H, n // group, d, group).transpose(0, 1, 2, 4, 3).reshape(B, H, n, d)
    else:
        deq = deq.reshape(B, H, n, d)
    return {"codes": packed, "scale": scale16.reshape(-1), "zero": lo16.reshape(-1)}, deq
