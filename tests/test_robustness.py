"""Bad or extreme input never gives a wrong answer: counts past int64, output file modes, protected files."""

import numpy as np

from perfmodel.costmodel.operators import count_arrays, kv_cache_bytes
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.specs import load_hardware, load_model


def test_counts_past_int64_stay_positive_and_finite():
    # 2**24 prompts of 2**24 tokens: attention FLOPs ~1e27, far past int64 (which would wrap to negative)
    a = analyze(load_model("llama-3.1-8b"), load_hardware("h100-sxm"), Workload(2**24, 2**24, 2))
    d = a.to_dict()
    for phase in ("prefill", "decode"):
        assert d[phase]["flops"] > 2**63 and d[phase]["bytes"] > 0
        assert np.isfinite(d[phase]["time_s"]) and d[phase]["time_s"] > 0
    assert all(r["flops"] >= 0 and r["bytes"] >= 0 for r in d["ops"])
    assert d["memory"]["kv_cache_bytes"] > 2**63


def test_small_counts_stay_exact_integers():
    b, t, p = count_arrays(8, 2048, np.arange(4))
    assert b.dtype.kind == t.dtype.kind == p.dtype.kind == "i"
    m = load_model("llama-3.1-8b")
    # closed form: 2 * layers * kv_heads * head_dim * tokens * bytes
    assert int(kv_cache_bytes(m, 1000, 3, "bf16")) == 2 * 32 * 8 * 128 * 1000 * 3 * 2
    assert float(kv_cache_bytes(m, 2**24, 2**24, "bf16")) == 2.0 * 32 * 8 * 128 * 2**24 * 2**24 * 2
