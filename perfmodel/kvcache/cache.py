"""A KV cache that compresses tokens as they leave the dense window, and that attention reads through.

Pruning (per-token / per-channel) keeps each old token's (or channel group's) most important elements in the
bitmap tile format; KIVI stores old tokens as packed 2/4-bit codes with fp16 scales and zero points; H2O and
StreamingLLM evict whole tokens (masked out of attention). Every decode step reads the compressed storage back
(decompressing the tiles, dequantising the codes): no dense copy of the history is kept. The dense buffers the
base class allocates hold only the window (older rows are stale scratch); the cache's size is what
`stored_bytes()` measures: the arrays that hold the compressed history plus the dense window.

Storage runs token-group-major ([token group, batch, kv_head, ...]) so the chunks compressed at different steps
simply concatenate.
"""

from __future__ import annotations

import numpy as np

from perfmodel.engine.transformer import KVCache
from perfmodel.errors import PerfmodelError
from perfmodel.kvcache import bitmap
from perfmodel.kvcache.methods import KVMethod


class CompressedKVCache(KVCache):
    capture: list | None = None  # set to [] to record each layer's attention output per forward

    def __init__(self, be, spec, batch: int, max_tokens: int, method: KVMethod):
        if be.name != "numpy":
            raise PerfmodelError("KV compression runs on the numpy backend")
        if method.kind in ("per-token", "per-channel") and spec.head_dim % bitmap.TILE:
            raise PerfmodelError(f"--kv-prune: pruning tiles are {bitmap.TILE} channels of one token; head_dim "
                                 f"{spec.head_dim} of {spec.name} is not a multiple of {bitmap.TILE}")
        super().__init__(be, spec, batch, max_tokens)
        self.method = method
        L, B, nkv, d = spec.num_layers, batch, spec.num_kv_heads, spec.head_dim
        self.d, self.nkv, self.B = d, nkv, B
        self.done = 0  # tokens [0, done) have left the window and been compressed / considered
        self.ck = [bitmap.BitmapTiles.empty(np.float32) for _ in range(L)]
        self.cv = [bitmap.BitmapTiles.empty(np.float32) for _ in range(L)]
        self.quant: list[dict] = [{} for _ in range(L)]  # kivi: packed codes, scales, zero points per stream
        self.alive = np.ones((B, nkv, max_tokens), dtype=bool)  # h2o / streaming evictions
        w = method.window
        self.q_ring = np.zeros((L, max(w, 1), B, nkv, d), dtype=np.float32)  # |q| of the last `window` queries
        self.q_pos = 0
        self.attn_acc = np.zeros((L, B, nkv, max_tokens), dtype=np.float32)  # attention each token received

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
        """K, V [B, nkv, end-first, d] as attention sees them, the alive mask [B, nkv, keys] or None, and the
        bytes of compressed storage read to produce them (0 when nothing is compressed)."""
        k, v = self.k[layer][:, :, first:end], self.v[layer][:, :, first:end]
        alive = self.alive[:, :, first:end] if self.method.kind in ("h2o", "streaming") else None
        n = min(self.done, end) - first
        if n <= 0 or self.method.kind not in ("per-token", "per-channel", "kivi"):
            return k, v, alive, 0
        hist_k, hist_v, nbytes = self._decode_history(layer)
        k = np.concatenate([hist_k[:, :, first:first + n], k[:, :, n:]], axis=2)
        v = np.concatenate([hist_v[:, :, first:first + n], v[:, :, n:]], axis=2)
        return k, v, alive, nbytes

    def _decode_history(self, i: int):
        """The compressed tokens [0, done) back to dense [B, nkv, done, d], from the stored arrays."""
        m, B, H, d, n = self.method, self.B, self.nkv, self.d, self.done
        if m.kind == "kivi":
            q = self.quant[i]
            kd = _dequantise(q["k_codes"], q["k_scale"], q["k_zero"], m.bits, m.group, B, H, n, d, "channel")
            vd = _dequantise(q["v_codes"], q["v_scale"], q["v_zero"], m.bits, m.group, B, H, n, d, "token")
            return kd, vd, sum(a.nbytes for a in q.values())
        kd = _from_tiles(bitmap.decompress(self.ck[i]), m.kind, B, H, n, d)
        vd = _from_tiles(bitmap.decompress(self.cv[i]), m.kind, B, H, n, d)
        return kd, vd, self.ck[i].nbytes + self.cv[i].nbytes

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
            q = self.quant[i]
            for name, seg, axis in (("k", kseg, "channel"), ("v", vseg, "token")):
                for key, arr in _quantise(seg, m.bits, m.group, axis).items():
                    full = f"{name}_{key}"
                    q[full] = np.concatenate([q[full], arr]) if full in q else arr
            return
        qsum = self.q_ring[i].sum(axis=0)  # [B, nkv, d]
        att = self.attn_acc[i][:, :, lo:hi]  # [B, nkv, n]
        kscore = np.abs(kseg) * (qsum[:, :, None, :] if m.score == "output" else 1.0)
        vscore = np.abs(vseg) * (att[..., None] if m.score == "output" else 1.0)
        self.ck[i] = bitmap.concat(self.ck[i], _prune(kseg, kscore, m.k_sparsity, m.kind))
        self.cv[i] = bitmap.concat(self.cv[i], _prune(vseg, vscore, m.v_sparsity, m.kind))

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


def _tiles_view(x: np.ndarray, kind: str) -> np.ndarray:
    """[B, H, n, d] -> token-group-major tiles of 64: per-token [n, B, H, d/64, 64]; per-channel
    [n/64, B, H, d, 64] (64 tokens of one channel)."""
    B, H, n, d = x.shape
    if kind == "per-token":
        return x.transpose(2, 0, 1, 3).reshape(-1, bitmap.TILE)
    return x.reshape(B, H, n // bitmap.TILE, bitmap.TILE, d).transpose(2, 0, 1, 4, 3).reshape(-1, bitmap.TILE)


def _from_tiles(tiles: np.ndarray, kind: str, B: int, H: int, n: int, d: int) -> np.ndarray:
    if kind == "per-token":
        return tiles.reshape(n, B, H, d).transpose(1, 2, 0, 3)
    return tiles.reshape(n // bitmap.TILE, B, H, d, bitmap.TILE).transpose(1, 2, 0, 4, 3).reshape(B, H, n, d)


def _prune(seg: np.ndarray, score: np.ndarray, sparsity: float, kind: str) -> bitmap.BitmapTiles:
    """Keep the top `kept` elements of every 64-element tile, stored in the tile format."""
    tiles, sc = np.ascontiguousarray(_tiles_view(seg, kind)), _tiles_view(score, kind)
    kept = bitmap.kept_per_tile(sparsity)
    idx = np.argpartition(-sc, kept - 1, axis=1)[:, :kept]
    keep = np.zeros(tiles.shape, dtype=bool)
    np.put_along_axis(keep, idx, True, axis=1)
    return bitmap.compress(tiles, keep)


def _groups(seg: np.ndarray, group: int, axis: str) -> np.ndarray:
    """Quantisation groups, token-group-major: K per channel over `group` tokens, V per token over channels."""
    B, H, n, d = seg.shape
    if axis == "channel":
        return seg.reshape(B, H, n // group, group, d).transpose(2, 0, 1, 4, 3).reshape(-1, group)
    return seg.transpose(2, 0, 1, 3).reshape(-1, group)


def _quantise(seg: np.ndarray, bits: int, group: int, axis: str) -> dict:
    """Asymmetric uniform quantisation (KIVI): codes packed 8/bits to a byte, fp16 scale and zero per group."""
    g = _groups(seg, group, axis)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    levels = 2 ** bits - 1
    scale = np.maximum(hi - lo, 1e-8) / levels
    codes = np.clip(np.rint((g - lo) / scale), 0, levels).astype(np.uint8)
    flat = codes.reshape(-1, 8 // bits)
    packed = np.zeros(flat.shape[0], dtype=np.uint8)
    for j in range(flat.shape[1]):
        packed |= (flat[:, j] << (bits * j)).astype(np.uint8)
    return {"codes": packed, "scale": scale.astype(np.float16).reshape(-1), "zero": lo.astype(np.float16).reshape(-1)}


def _dequantise(packed, scale, zero, bits: int, group: int, B: int, H: int, n: int, d: int, axis: str):
    per_byte = 8 // bits
    codes = (packed[:, None] >> (bits * np.arange(per_byte, dtype=np.uint8))) & np.uint8(2 ** bits - 1)
    g = codes.reshape(-1, group).astype(np.float32) * scale.astype(np.float32)[:, None] \
        + zero.astype(np.float32)[:, None]
    if axis == "channel":
        return g.reshape(n // group, B, H, d, group).transpose(1, 2, 0, 4, 3).reshape(B, H, n, d)
    return g.reshape(n, B, H, d).transpose(1, 2, 0, 3)
