import json

import numpy as np
import pytest

from conftest import needs_weights, small
from perfmodel.cli.app import main
from perfmodel.costmodel.kv_compression import kv_stored_bytes
from perfmodel.engine.backend import make_backend
from perfmodel.engine.transformer import Transformer
from perfmodel.engine.weights import random_weights
from perfmodel.errors import PerfmodelError
from perfmodel.kvcache import bitmap
from perfmodel.kvcache.cache import CompressedKVCache
from perfmodel.kvcache.methods import KVMethod
from perfmodel.specs import load_model

METHODS = ["dense", "per-token:0.7", "per-token:0.5/0.3:output", "per-channel:0.7", "per-channel:0.9:output",
           "kivi:4", "kivi:2", "h2o:0.7", "streaming:0.5"]


def test_bitmap_round_trip_and_bytes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 64)).astype(np.float32)
    for s in (0.3, 0.7, 0.9):
        k = bitmap.kept_per_tile(s)
        keep = np.zeros_like(x, dtype=bool)
        np.put_along_axis(keep, np.argsort(-np.abs(x), axis=1)[:, :k], True, axis=1)
        t = bitmap.compress(x, keep)
        np.testing.assert_array_equal(bitmap.decompress(t), np.where(keep, x, 0))
        assert t.nbytes == bitmap.compressed_bytes(37, k, 4) == 37 * (8 + 4 + bitmap.padded(k) * 4)
        assert np.all(t.offsets % bitmap.VALUE_ALIGN == 0)


def test_compressed_attention_equals_dense_attention_with_same_mask():
    """Decode attention through the tile format = dense attention on K/V with the pruned entries zeroed."""
    from perfmodel.kvcache.cache import _from_tiles

    spec = small("smollm2-135m", num_layers=1, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    m = Transformer(spec, random_weights(spec, 3), make_backend("numpy"))
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (2, 100))
    cache = CompressedKVCache(m.be, spec, 2, 120, KVMethod.parse("per-token:0.7", window=8))
    m.forward(ids[:, :90], cache)
    k, v, _, stored = cache.read(0, 0, cache.length)
    assert stored == cache.ck[0].nbytes + cache.cv[0].nbytes > 0
    # the mask, rebuilt independently from the bitmaps, applied to the raw (uncompressed) values
    bits = (cache.ck[0].bitmaps[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    keep = _from_tiles(bits.astype(bool), "per-token", 2, 2, cache.done, spec.head_dim)
    raw_k, raw_v = cache.k[0][:, :, :cache.done], cache.v[0][:, :, :cache.done]
    np.testing.assert_array_equal(k[:, :, :cache.done], np.where(keep, raw_k, 0))
    assert (keep.sum(axis=-1) == bitmap.kept_per_tile(0.7) * spec.head_dim // 64).all()
    np.testing.assert_array_equal(k[:, :, cache.done:], cache.k[0][:, :, cache.done:cache.length])
    # the next decode step's logits equal a dense engine fed the same masked K/V
    from perfmodel.engine.transformer import KVCache
    dense = KVCache(m.be, spec, 2, 120)
    dense.k[0][:, :, :90], dense.v[0][:, :, :90] = k, v
    dense.length = 90
    np.testing.assert_allclose(m.forward(ids[:, 90:91], dense), m.forward(ids[:, 90:91], cache), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("method", ["per-token:0.7", "per-channel:0.5:output", "kivi:2"])
def test_decode_reads_compressed_storage_as_the_cost_model_counts(method):
    """Each decode step's kv_decompress reads exactly the compressed history the cost model's formula sizes."""
    from perfmodel.costmodel.kv_compression import kv_stored_bytes_per_layer
    from perfmodel.engine.tracer import Tracer

    spec = small("smollm2-135m", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128,
                 max_position=512)
    tr = Tracer(enabled=True, timed=False)
    m = Transformer(spec, random_weights(spec, 5), make_backend("numpy"), tracer=tr)
    mt = KVMethod.parse(method)
    cache = CompressedKVCache(m.be, spec, 2, 300, mt)
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, (2, 230))
    m.forward(ids[:, :200], cache)
    for t in range(200, 230):
        tr.clear()
        before = cache.length
        m.forward(ids[:, t:t + 1], cache)
        reads = [r.kv_read_bytes for r in tr.records if r.name == "kv_decompress"]
        # the history as compressed after the previous forward: stored bytes minus its dense window
        window_bytes = kv_stored_bytes_per_layer(spec, KVMethod(), before - cache_done(mt, before), 2, "fp32")
        expected = kv_stored_bytes_per_layer(spec, mt, before, 2, "fp32") - window_bytes
        assert reads == [expected] * spec.num_layers


def cache_done(method, length):
    from perfmodel.costmodel.kv_compression import compressed_tokens

    return int(compressed_tokens(method, length))


def test_evicted_keys_leave_the_flop_count():
    from perfmodel.costmodel.kv_compression import attended_keys
    from perfmodel.engine.tracer import Tracer

    spec = small("smollm2-135m", num_layers=1, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                 max_position=512)
    tr = Tracer(enabled=True, timed=False)
    m = Transformer(spec, random_weights(spec, 6), make_backend("numpy"), tracer=tr)
    mt = KVMethod.parse("h2o:0.6")
    cache = CompressedKVCache(m.be, spec, 1, 300, mt)
    ids = np.random.default_rng(4).integers(0, spec.vocab_size, (1, 201))
    m.forward(ids[:, :200], cache)
    tr.clear()
    m.forward(ids[:, 200:201], cache)
    qk = [r.flops for r in tr.records if r.name == "qk"][0]
    assert qk == 2 * spec.head_dim * spec.num_heads * int(attended_keys(mt, 200))


@pytest.mark.parametrize("method", METHODS)
def test_engine_measured_kv_bytes_equal_cost_model(method):
    spec = small("smollm2-135m", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128,
                 max_position=512)
    m = Transformer(spec, random_weights(spec, 4), make_backend("numpy"))
    mt = KVMethod.parse(method)
    cache = CompressedKVCache(m.be, spec, 3, 300, mt)
    ids = np.random.default_rng(2).integers(0, spec.vocab_size, (3, 260))
    m.forward(ids[:, :150], cache)
    for t in range(150, 260, 7):
        assert cache.stored_bytes() == kv_stored_bytes(spec, mt, cache.length, 3, "fp32"), cache.length
        for u in range(t, min(t + 7, 260)):
            m.forward(ids[:, u:u + 1], cache)
    assert cache.stored_bytes() == kv_stored_bytes(spec, mt, 260, 3, "fp32")


def test_analyzer_reproduces_mustafar_direction():
    m = load_model("llama-3.1-8b")  # head_dim 128
    dense = kv_stored_bytes(m, KVMethod(), 8192, 1, "fp16")
    frac = kv_stored_bytes(m, KVMethod.parse("per-token:0.7"), 8192, 1, "fp16") / dense
    assert 0.45 <= frac <= 0.50
    assert kv_stored_bytes(m, KVMethod.parse("per-token:0.9"), 8192, 1, "fp16") < frac * dense


def test_analyze_kv_prune_cli(capsys):
    base = ["analyze", "--model", "llama-3.1-8b", "--batch", "16", "--input", "4096", "--output", "256",
            "--format", "json"]
    assert main(base) == 0
    dense = json.loads(capsys.readouterr()[0])
    assert main(base + ["--kv-prune", "per-token:0.7"]) == 0
    pruned = json.loads(capsys.readouterr()[0])
    assert pruned["kv_method"] == "per-token:0.7"
    assert pruned["memory"]["kv_cache_bytes"] < 0.5 * dense["memory"]["kv_cache_bytes"]
    assert pruned["request"]["tpot_last_s"] < dense["request"]["tpot_last_s"]
    assert main(base + ["--kv-prune", "per-token:1.5"]) == 2
    assert "--kv-prune" in capsys.readouterr()[1]


def test_method_parsing():
    assert KVMethod.parse("per-token:0.7/0.5:output").v_sparsity == 0.5
    for bad in ("per-token", "kivi:3", "h2o:0.7:output", "zip:0.5", "per-channel:1"):
        with pytest.raises(PerfmodelError):
            KVMethod.parse(bad)


@needs_weights
@pytest.mark.weights
def test_quality_on_real_weights(smollm2):
    from perfmodel.kvcache.quality import evaluate

    spec, w, tok = smollm2
    m = Transformer(spec, w, make_backend("numpy"))
    rows = {r["method"]: r for r in evaluate(m, tok, ["per-token:0.3", "per-token:0.9", "kivi:4"], context=160,
                                             steps=12)}
    assert rows["dense"]["kl_divergence"] == 0 and rows["dense"]["top1_agreement"] == 1
    assert rows["per-token:0.3"]["kl_divergence"] < rows["per-token:0.9"]["kl_divergence"]
    assert rows["kivi:4"]["top1_agreement"] > 0.8
    for r in rows.values():
        assert r["kv_bytes"] == r["model_kv_bytes"]
