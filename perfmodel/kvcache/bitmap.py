"""The bitmap tile format for pruned K/V (after Mustafar, arXiv 2505.22913).

Layout, per compressed stream (one layer's K or V, all sequences and KV heads, flattened in row-major order of
[batch, kv_head, unit, 64]):
- tiles of 64 consecutive elements; pruning keeps exactly `kept` of every tile's 64 (per-token pruning: a tile
  is 64 channels of one token; per-channel pruning: 64 tokens of one channel, stored transposed);
- bitmaps: uint64 per tile, bit j set when element j is kept;
- values: the kept elements of each tile in order, padded with zeros to a multiple of VALUE_ALIGN elements so
  every tile's values start 16-byte aligned for vector loads;
- offsets: uint32 per tile, the index in `values` where the tile's values start.
Bytes = tiles * (8 + 4 + padded(kept) * value_bytes): what the cost model's formula says, and what nbytes of
the three arrays measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 64
VALUE_ALIGN = 8


def padded(kept: int) -> int:
    return -(-kept // VALUE_ALIGN) * VALUE_ALIGN


def kept_per_tile(sparsity: float) -> int:
    """Elements a tile keeps at this sparsity (at least one)."""
    return max(1, int(round((1.0 - sparsity) * TILE)))


def compressed_bytes(n_tiles, kept: int, value_bytes: int):
    return n_tiles * (8 + 4 + padded(kept) * value_bytes)


@dataclass
class BitmapTiles:
    bitmaps: np.ndarray  # uint64 [tiles]
    values: np.ndarray  # [tiles * padded(kept)]
    offsets: np.ndarray  # uint32 [tiles]
    kept: int

    @property
    def nbytes(self) -> int:
        return int(self.bitmaps.nbytes + self.values.nbytes + self.offsets.nbytes)

    @property
    def n_tiles(self) -> int:
        return len(self.bitmaps)

    @staticmethod
    def empty(dtype) -> "BitmapTiles":
        return BitmapTiles(np.zeros(0, np.uint64), np.zeros(0, dtype), np.zeros(0, np.uint32), 0)


def compress(tiles: np.ndarray, keep: np.ndarray) -> BitmapTiles:
    """tiles [n, 64] values and keep [n, 64] bool with the same count `kept` per row -> the tile format."""
    n = tiles.shape[0]
    kept = int(keep[0].sum()) if n else 0
    if n and not np.all(keep.sum(axis=1) == kept):
        raise ValueError("every tile must keep the same number of elements")
    weights = (np.uint64(1) << np.arange(TILE, dtype=np.uint64))
    bitmaps = (keep.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    width = padded(kept)
    values = np.zeros((n, width), dtype=tiles.dtype)
    values[:, :kept] = tiles[keep].reshape(n, kept)  # row-major: each tile's kept elements in channel order
    offsets = (np.arange(n, dtype=np.uint32) * width).astype(np.uint32)
    return BitmapTiles(bitmaps, values.reshape(-1), offsets, kept)


def decompress(t: BitmapTiles) -> np.ndarray:
    """The tile format back to dense [n, 64] with zeros where pruned (what decode attention reads)."""
    n = t.n_tiles
    if n == 0:
        return np.zeros((0, TILE), dtype=t.values.dtype)
    bits = ((t.bitmaps[:, None] >> np.arange(TILE, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    out = np.zeros((n, TILE), dtype=t.values.dtype)
    width = padded(t.kept)
    vals = t.values.reshape(n, width)[:, :t.kept]
    out[bits] = vals.reshape(-1)
    return out


def concat(a: BitmapTiles, b: BitmapTiles) -> BitmapTiles:
    if a.n_tiles == 0:
        return b
    if b.n_tiles == 0:
        return a
    assert a.kept == b.kept
    width = padded(a.kept)
    return BitmapTiles(np.concatenate([a.bitmaps, b.bitmaps]), np.concatenate([a.values, b.values]),
                       (np.arange(a.n_tiles + b.n_tiles, dtype=np.uint32) * width).astype(np.uint32), a.kept)
