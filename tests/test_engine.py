import numpy as np
import pytest

from conftest import needs_torch, small
from perfmodel.costmodel.operators import Precision, kv_cache_bytes
from perfmodel.engine.backend import make_backend
from perfmodel.engine.generate import generate
from perfmodel.engine.sampling import SamplingParams
from perfmodel.engine.tracer import Tracer
from perfmodel.engine.transformer import KVCache, Transformer
from perfmodel.engine.weights import random_weights
from perfmodel.validation.counts import compare_generation

ARCHS = {
    "llama-gqa": ("smollm2-135m", {}),
    "llama-mqa": ("llama-3.1-8b", {"num_kv_heads": 1}),
    "llama-mha-untied": ("llama-2-7b", {"num_kv_heads": 4}),
    "qwen-qkv-bias": ("qwen2.5-7b", {}),
    "gemma-headdim": ("gemma-7b", {}),
    "mixtral-moe": ("mixtral-8x7b", {}),
    "gpt2": ("gpt2", {}),
    "mistral-window": ("mistral-7b", {"sliding_window": 6}),
}


def _spec(key):
    name, kw = ARCHS[key]
    return small(name, **kw)


def _prefill_decode_logits(m, ids, n_prefill):
    cache = KVCache(m.be, m.spec, ids.shape[0], ids.shape[1])
    out = [m.be.to_numpy(m.forward(ids[:, :n_prefill], cache, all_logits=True))]
    for t in range(n_prefill, ids.shape[1]):
        out.append(m.be.to_numpy(m.forward(ids[:, t:t + 1], cache)))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_plus_decode_equals_full_forward_numpy(arch):
    spec = _spec(arch)
    m = Transformer(spec, random_weights(spec, 1), make_backend("numpy"))
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 13))
    full = m.be.to_numpy(m.forward(ids, KVCache(m.be, spec, 2, 13), all_logits=True))
    step = _prefill_decode_logits(m, ids, 5)
    np.testing.assert_allclose(step, full, rtol=1e-4, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("arch", list(ARCHS))
def test_numpy_equals_torch_and_flash(arch):
    spec = _spec(arch)
    w = random_weights(spec, 2)
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (2, 11))
    ref = _prefill_decode_logits(Transformer(spec, w, make_backend("numpy")), ids, 4)
    for flash in (False, True):
        got = _prefill_decode_logits(Transformer(spec, w, make_backend("torch"), flash=flash), ids, 4)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama-gqa", "mixtral-moe", "gpt2"])
def test_cache_and_no_cache_generate_same_tokens_and_logits(arch):
    spec = _spec(arch)
    m = Transformer(spec, random_weights(spec, 3), make_backend("numpy"), tracer=Tracer(enabled=True, timed=False))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    a = generate(m, prompts, 8, SamplingParams())
    flops_cached = sum(r.flops for r in m.tr.records)
    m.tr.clear()
    b = generate(m, prompts, 8, SamplingParams(), use_cache=False)
    flops_recompute = sum(r.flops for r in m.tr.records)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert flops_recompute > 2 * flops_cached  # same logits, very different cost


def test_batched_generation_with_different_prompt_lengths_matches_single_runs():
    spec = _spec("llama-gqa")
    m = Transformer(spec, random_weights(spec, 4), make_backend("numpy"))
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10]]
    batched = generate(m, prompts, 6, SamplingParams())
    for b, p in enumerate(prompts):
        single = generate(m, [p], 6, SamplingParams())
        np.testing.assert_array_equal(batched.tokens[b], single.tokens[0])


def test_eos_stops_and_per_sequence_lengths():
    spec = _spec("llama-gqa")
    m = Transformer(spec, random_weights(spec, 5), make_backend("numpy"))
    g = generate(m, [[1, 2, 3]], 10, SamplingParams())
    eos = int(g.tokens[0, 2])  # pretend the third generated token is EOS
    g2 = generate(m, [[1, 2, 3]], 10, SamplingParams(), eos_id=eos)
    assert g2.lengths[0] <= 3 and g2.tokens.shape[1] <= 10


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("structure", ["eager", "fused"])
@pytest.mark.parametrize("backend,dtype,flash", [("numpy", "fp32", False), ("torch", "fp32", True),
                                                 ("torch", "bf16", True), ("torch", "bf16", False)])
def test_engine_counts_equal_cost_model_exactly(arch, backend, dtype, flash, structure):
    """Per operator, phase and step, in both operator structures (the fused one is the cost model's fused
    execution mode: qkv_proj, gate_up_proj, add_norm, and with flash RoPE + KV write inside attention)."""
    if backend == "torch":
        pytest.importorskip("torch")
    spec = _spec(arch)
    tr = Tracer(enabled=True, timed=False)
    m = Transformer(spec, random_weights(spec, 6), make_backend(backend, dtype), flash=flash, tracer=tr,
                    structure=structure)
    B, T = 3, 9
    generate(m, [list(range(1, T + 1))] * B, 7, SamplingParams())
    mism = compare_generation(spec, tr.records, B, T, Precision(dtype, dtype, dtype), flash, tr.experts_touched,
                              exec_mode=structure)
    assert not mism, "\n".join(map(str, mism[:10]))


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen-qkv-bias", "mixtral-moe", "gpt2", "mistral-window"])
@pytest.mark.parametrize("backend,flash", [("numpy", False), ("torch", True)])
def test_fused_structure_gives_the_same_logits(arch, backend, flash):
    if backend == "torch":
        pytest.importorskip("torch")
    spec = _spec(arch)
    w = random_weights(spec, 8)
    ids = np.random.default_rng(2).integers(0, spec.vocab_size, (2, 10))
    eager = _prefill_decode_logits(Transformer(spec, w, make_backend(backend), flash=flash), ids, 4)
    fused = _prefill_decode_logits(Transformer(spec, w, make_backend(backend), flash=flash, structure="fused"), ids, 4)
    np.testing.assert_allclose(fused, eager, rtol=1e-5, atol=1e-6)


def test_kv_cache_real_bytes_follow_formula():
    spec = _spec("llama-gqa")
    be = make_backend("numpy")
    m = Transformer(spec, random_weights(spec, 7), be)
    cache = KVCache(be, spec, 2, 40)
    assert cache.nbytes() == kv_cache_bytes(spec, 40, 2, "fp32")
    m.forward(np.ones((2, 9), dtype=np.int64), cache)
    assert cache.used_bytes() == kv_cache_bytes(spec, 9, 2, "fp32") == 2 * spec.num_layers * 2 * 16 * 9 * 4 * 2


@needs_torch
def test_torch_flops_match_flop_counter_mode():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    spec = _spec("llama-mha-untied")
    tr = Tracer(enabled=True, timed=False)
    m = Transformer(spec, random_weights(spec, 8), make_backend("torch"), flash=False, tracer=tr)
    ids = np.arange(1, 17)[None, :]
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            m.forward(ids, KVCache(m.be, spec, 1, 16), all_logits=True)
    counted = fc.get_total_flops()
    # FlopCounterMode counts matmuls only, and the full (unmasked) score matrices
    ours = sum(r.flops for r in tr.records if r.name.endswith(("_proj", "lm_head")))
    T, H, d = 16, spec.num_heads, spec.head_dim
    full_attention = spec.num_layers * 2 * (2 * T * T * d * H)
    assert counted == ours + full_attention
    causal = sum(r.flops for r in tr.records if r.name in ("qk", "av"))
    assert causal == full_attention * (T + 1) // (2 * T)  # the mask keeps T(T+1)/2 of T^2
