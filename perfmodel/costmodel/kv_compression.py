"""Compressed KV caches in the cost model: bytes stored (metadata included) and bytes a decode step reads.

The formulas follow the engine's formats exactly (perfmodel/kvcache): tokens older than the dense window are
compressed; per-token pruning works token by token, per-channel pruning and KIVI in whole groups of tokens.
- pruning: tiles of 64 elements, each 8 B bitmap + 4 B offset + its kept values padded to a multiple of 8;
- KIVI: bits/8 bytes per value, fp16 scale and zero point per group (K per channel over `group` tokens,
  V per token over `group` channels);
- H2O / StreamingLLM: (1-s) of the old tokens kept whole, with a 4-byte position each.
"""

from __future__ import annotations

import numpy as np

from perfmodel.dtypes import get_dtype
from perfmodel.kvcache import bitmap
from perfmodel.kvcache.methods import KVMethod
from perfmodel.specs.model import ModelSpec

SCALE_BYTES = 2
INDEX_BYTES = 4


def compressed_tokens(method: KVMethod, tokens):
    """Tokens held in compressed form once `tokens` are cached."""
    old = np.maximum(np.asarray(tokens) - method.window, 0)
    if method.kind == "per-channel":
        return old // bitmap.TILE * bitmap.TILE
    if method.kind == "kivi":
        return old // method.group * method.group
    return old if method.kind != "dense" else np.zeros_like(old)


def kept_tokens(method: KVMethod, compressed):
    """H2O / StreamingLLM: old tokens kept (per sequence and KV head)."""
    return np.rint((1 - method.k_sparsity) * np.asarray(compressed, dtype=np.float64)).astype(np.int64)


def kv_stored_bytes_per_layer(model: ModelSpec, method: KVMethod, tokens, batch=1, value_dtype: str = "bf16"):
    """Bytes one layer's cache occupies for `batch` sequences of `tokens` tokens."""
    if model.is_mla:
        from perfmodel.errors import PerfmodelError
        raise PerfmodelError(f"--kv-prune: {model.name} caches an MLA latent; pruning applies to K/V heads")
    vb = get_dtype(value_dtype).bits // 8
    nkv, d = model.num_kv_heads, model.head_dim
    tokens = np.asarray(tokens)
    done = compressed_tokens(method, tokens)
    window = (tokens - done) * 2 * nkv * d * vb
    if method.kind == "dense":
        stored = tokens * 2 * nkv * d * vb
    elif method.kind in ("per-token", "per-channel"):
        tiles = nkv * done * d // bitmap.TILE
        stored = window + sum(bitmap.compressed_bytes(tiles, bitmap.kept_per_tile(s), vb)
                              for s in (method.k_sparsity, method.v_sparsity))
    elif method.kind == "kivi":
        codes = 2 * nkv * done * d * method.bits // 8
        groups = 2 * nkv * done * d // method.group  # K: per channel per token group; V: per token per channel group
        stored = window + codes + groups * 2 * SCALE_BYTES
    else:
        stored = window + nkv * kept_tokens(method, done) * (2 * d * vb + INDEX_BYTES)
    return batch * stored


def kv_stored_bytes(model: ModelSpec, method: KVMethod, tokens, batch=1, value_dtype: str = "bf16"):
    return model.num_layers * kv_stored_bytes_per_layer(model, method, tokens, batch, value_dtype)


def attended_keys(method: KVMethod, past):
    """Keys the next token's query attends to after `past` cached tokens: all past + 1, or for H2O/streaming the
    kept old tokens plus the rest (the cache compresses after each forward, so the step sees done(past))."""
    past = np.asarray(past)
    if method.kind in ("h2o", "streaming"):
        done = compressed_tokens(method, past)
        return past + 1 - done + kept_tokens(method, done)
    return past + 1


def decode_read_bytes_per_layer(model: ModelSpec, method: KVMethod, past, batch=1, value_dtype: str = "bf16"):
    """What a decode step reads from one layer's cache: the history as stored after `past` tokens plus the new
    token's dense K/V."""
    vb = get_dtype(value_dtype).bits // 8
    return kv_stored_bytes_per_layer(model, method, past, batch, value_dtype) \
        + batch * 2 * model.num_kv_heads * model.head_dim * vb
