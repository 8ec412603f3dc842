"""Today's models: parameter counts against the published figures, KV bytes per token per layer type against
hand-derived figures, per-layer-type structure in the cost model, config.json mapping and Hugging Face cache
resolution."""

import json

import numpy as np
import pytest

from perfmodel.costmodel.operators import Precision, kv_bytes_per_token_layer, kv_cache_bytes, phase_ops
from perfmodel.errors import PerfmodelError
from perfmodel.specs import load_model
from perfmodel.specs.model import model_from_hf_config

NEW_MODELS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b", "llama-4-scout-17b-16e", "llama-4-maverick-17b-128e",
              "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "gemma-2-9b", "gemma-2-27b",
              "gemma-3-12b", "gemma-3-27b", "gpt-oss-20b", "gpt-oss-120b", "phi-4", "mixtral-8x22b", "deepseek-r1"]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_parameter_count_within_half_a_percent_of_published(name):
    m = load_model(name)
    assert abs(m.param_count() / m.published_params - 1) < 0.005


# Active parameters per token as published (model cards; Mistral's announcement for Mixtral-8x22B). OpenAI counts
# gpt-oss's active figure without the embedding table (a gather, not a matmul).
PUBLISHED_ACTIVE = {"llama-4-scout-17b-16e": 17e9, "llama-4-maverick-17b-128e": 17e9, "qwen3-30b-a3b": 3.3e9,
                    "qwen3-235b-a22b": 22e9, "mixtral-8x22b": 39e9, "deepseek-r1": 37e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE))
def test_active_parameters_match_the_model_cards_rounding(name):
    m = load_model(name)
    assert abs(m.param_count(active=True) / PUBLISHED_ACTIVE[name] - 1) < 0.02


@pytest.mark.parametrize("name,active", [("gpt-oss-20b", 3.61e9), ("gpt-oss-120b", 5.13e9)])
def test_gpt_oss_active_parameters_without_the_embedding(name, active):
    m = load_model(name)
    assert abs((m.param_count(active=True) - m.embedding_params()) / active - 1) < 0.002


# bf16 KV bytes per token, per layer type, summed over that type's layers, derived by hand from the configs:
# 2 (K and V) * kv_heads * head_dim * 2 bytes * layers of the type (MLA: (kv_lora_rank + rope dim) * 2 * layers).
# Layer counts: Gemma 2 alternates 1:1; Gemma 3 repeats 5 sliding + 1 global (62 layers: 52 + 10); gpt-oss
# alternates 1:1; Llama 4 repeats 3 chunked + 1 global.
KV_PER_TOKEN = {
    "llama-3.2-1b": {"global": 16 * 2 * 8 * 64 * 2},  # 32,768
    "llama-3.2-3b": {"global": 28 * 2 * 8 * 128 * 2},  # 114,688
    "llama-3.3-70b": {"global": 80 * 2 * 8 * 128 * 2},  # 327,680
    "llama-4-scout-17b-16e": {"chunked": 36 * 4096, "global": 12 * 4096},
    "llama-4-maverick-17b-128e": {"chunked": 36 * 4096, "global": 12 * 4096},
    "qwen3-8b": {"global": 36 * 2 * 8 * 128 * 2},  # 147,456
    "qwen3-32b": {"global": 64 * 2 * 8 * 128 * 2},  # 262,144
    "qwen3-30b-a3b": {"global": 48 * 2 * 4 * 128 * 2},  # 98,304
    "qwen3-235b-a22b": {"global": 94 * 2 * 4 * 128 * 2},  # 192,512
    "gemma-2-9b": {"sliding": 21 * 2 * 8 * 256 * 2, "global": 21 * 2 * 8 * 256 * 2},  # 172,032 each
    "gemma-2-27b": {"sliding": 23 * 2 * 16 * 128 * 2, "global": 23 * 2 * 16 * 128 * 2},  # 188,416 each
    "gemma-3-12b": {"sliding": 40 * 2 * 8 * 256 * 2, "global": 8 * 2 * 8 * 256 * 2},  # 327,680 / 65,536
    "gemma-3-27b": {"sliding": 52 * 2 * 16 * 128 * 2, "global": 10 * 2 * 16 * 128 * 2},  # 425,984 / 81,920
    "gpt-oss-20b": {"sliding": 12 * 2 * 8 * 64 * 2, "global": 12 * 2 * 8 * 64 * 2},  # 24,576 each
    "gpt-oss-120b": {"sliding": 18 * 2 * 8 * 64 * 2, "global": 18 * 2 * 8 * 64 * 2},  # 36,864 each
    "phi-4": {"global": 40 * 2 * 10 * 128 * 2},  # 204,800
    "mixtral-8x22b": {"global": 56 * 2 * 8 * 128 * 2},  # 229,376
    "deepseek-r1": {"global": 61 * (512 + 64) * 2},  # 70,272
}
SPANS = {"gemma-2-9b": 4096, "gemma-2-27b": 4096, "gemma-3-12b": 1024, "gemma-3-27b": 1024, "gpt-oss-20b": 128,
         "gpt-oss-120b": 128, "llama-4-scout-17b-16e": 8192, "llama-4-maverick-17b-128e": 8192}


@pytest.mark.parametrize("name", NEW_MODELS)
def test_kv_bytes_per_token_per_layer_type(name):
    m = load_model(name)
    per_layer = kv_bytes_per_token_layer(m, "bf16")
    got = {t: n * per_layer for t, n in m.layer_type_counts().items()}
    assert got == KV_PER_TOKEN[name]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_kv_cache_sums_layer_types_and_caps_local_layers(name):
    m = load_model(name)
    want = KV_PER_TOKEN[name]
    for tokens in (1, 100, 5000, 100_000):
        cap = SPANS.get(name)
        local = sum(v for t, v in want.items() if t != "global")
        expected = want.get("global", 0) * tokens + local * (min(tokens, cap) if cap else tokens)
        assert kv_cache_bytes(m, tokens, 1, "bf16") == expected
        assert kv_cache_bytes(m, tokens, 3, "bf16") == 3 * expected


def test_gemma3_holds_far_less_kv_than_all_global_at_long_context():
    m = load_model("gemma-3-27b")
    dense = m.replace(attention_pattern=(), sliding_window=None)
    ratio = kv_cache_bytes(m, 131072, 1, "bf16") / kv_cache_bytes(dense, 131072, 1, "bf16")
    assert ratio == pytest.approx((10 + 52 * 1024 / 131072) / 62)


def _ops(m, **kw):
    return {op.name: op for op in phase_ops(m, **kw)}


def test_attention_is_one_operator_per_layer_type():
    m = load_model("gemma-2-9b")
    ops = _ops(m, batch=2, new_tokens=6000, past_tokens=0)
    assert (ops["attention"].layers, ops["attention_local"].layers) == (21, 21)
    # global: every causal pair; local: a query sees at most 4096 keys (its own included)
    T, W, nq = 6000, 4096, m.num_heads
    pairs_global = T * (T + 1) // 2
    pairs_local = W * (W + 1) // 2 + (T - W) * W
    per_pair = 2 * m.head_dim * 2 + 5 + 3  # QK^T, attention*V, softmax, tanh soft-cap
    assert ops["attention"].flops == 2 * nq * pairs_global * per_pair
    assert ops["attention_local"].flops == 2 * nq * pairs_local * per_pair
    # decode: the local layers read only their window of the cache
    dec = _ops(m, batch=1, new_tokens=1, past_tokens=9999)
    kv_layer = kv_bytes_per_token_layer(m, "bf16")
    assert dec["attention"].kv_read_bytes == 10000 * kv_layer
    assert dec["attention_local"].kv_read_bytes == W * kv_layer


def test_chunked_attention_counts_pairs_within_each_chunk():
    m = load_model("llama-4-scout-17b-16e")
    C = 8192
    ops = _ops(m, batch=1, new_tokens=20000, past_tokens=0)
    assert (ops["attention"].layers, ops["attention_chunked"].layers) == (12, 36)
    pairs = 2 * C * (C + 1) // 2 + (20000 - 2 * C) * (20000 - 2 * C + 1) // 2
    assert ops["attention_chunked"].flops == m.num_heads * pairs * (4 * m.head_dim + 5)
    # a decode step at position p sees (p mod C) + 1 keys of its chunk
    dec = _ops(m, batch=1, new_tokens=1, past_tokens=C + 9)
    assert dec["attention_chunked"].flops == m.num_heads * 10 * (4 * m.head_dim + 5)
    assert dec["attention_chunked"].kv_read_bytes == 10 * kv_bytes_per_token_layer(m, "bf16")
    # NoPE global layers: RoPE and the L2 q/k norm run on the 36 chunked layers only
    assert ops["rope"].layers == 36 and ops["qk_norm"].layers == 36


@pytest.mark.parametrize("flash", [True, False])
def test_attention_sinks_add_one_score_per_query_and_head(flash):
    m = load_model("gpt-oss-20b")
    base = m.replace(attention_sinks=False)
    kw = dict(batch=2, new_tokens=300, past_tokens=0, flash=flash)
    with_sinks, without = phase_ops(m, **kw), phase_ops(base, **kw)
    extra = sum(o.flops * o.layers for o in with_sinks) - sum(o.flops * o.layers for o in without)
    assert extra == 2 * 300 * m.num_heads * 5 * m.num_layers  # each extra score: the softmax's 5 FLOPs


def test_qk_norm_and_softcap_operators():
    q = _ops(load_model("qwen3-8b"), batch=1, new_tokens=10)
    m = load_model("qwen3-8b")
    assert q["qk_norm"].layers == 36
    assert q["qk_norm"].flops == 10 * (m.num_heads + m.num_kv_heads) * m.head_dim * 4
    g = _ops(load_model("gemma-2-9b"), batch=3, new_tokens=10)
    assert g["logit_softcap"].flops == 3 * 256000 * 3  # last-token logits of 3 sequences, 3 FLOPs each
    assert "logit_softcap" not in _ops(load_model("gemma-3-12b"), batch=1, new_tokens=10)
    assert {"attn_post_norm", "mlp_post_norm"} <= set(g)


def test_interleaved_moe_and_shared_expert():
    m = load_model("llama-4-maverick-17b-128e")
    assert (m.moe_layers, m.dense_layers) == (24, 24)
    ops = _ops(m, batch=1, new_tokens=1, past_tokens=100)
    assert ops["gate_proj"].layers == 24 and ops["expert_gate"].layers == 24 and ops["shared_gate_proj"].layers == 24
    assert ops["gate_proj"].flops == 2 * m.hidden_size * 16384
    assert ops["shared_gate_proj"].flops == 2 * m.hidden_size * 8192


def test_gpt_oss_experts_are_mxfp4_and_the_rest_bf16():
    from perfmodel.costmodel.operators import weight_memory_bytes
    from perfmodel.dtypes import tensor_bytes

    m = load_model("gpt-oss-120b")
    ops = _ops(m, batch=1, new_tokens=1, past_tokens=10, experts_touched=4)
    h, f = m.hidden_size, m.intermediate_size
    assert ops["expert_down"].weight_bytes == 4 * (tensor_bytes(f * h, "mxfp4") + h * 2)  # + the down bias
    assert ops["q_proj"].weight_bytes == tensor_bytes(h * 64 * 64, "bf16") + 64 * 64 * 2
    # the published checkpoint: about 61 GiB (MXFP4 experts, bf16 elsewhere)
    assert weight_memory_bytes(m, Precision()) / 2**30 == pytest.approx(60.8, rel=0.02)
    assert weight_memory_bytes(m, Precision(experts="bf16")) / 2**30 > 200


def test_existing_models_keep_their_operator_names():
    names = [op.name for op in phase_ops(load_model("mistral-7b"), 1, 16)]
    assert "attention" in names and not any(n.endswith("_local") for n in names)
    assert "qk_norm" not in names and "logit_softcap" not in names


# --- config.json mapping and the Hugging Face cache --------------------------------------------------------------

HF_CONFIGS = {
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 500000.0,
                     "rms_norm_eps": 1e-05},
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False, "rope_theta": 1000000,
                 "rms_norm_eps": 1e-06, "use_sliding_window": False, "sliding_window": None,
                 "max_window_layers": 36},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
                      "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "use_sliding_window": False},
    "gemma-2-9b": {"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000,
                   "max_position_embeddings": 8192, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-06, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma-3-12b": {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                    "text_config": {"model_type": "gemma3_text", "hidden_size": 3840, "num_hidden_layers": 48,
                                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                                    "intermediate_size": 15360, "vocab_size": 262208, "sliding_window": 1024,
                                    "sliding_window_pattern": 6, "max_position_embeddings": 131072,
                                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
                                    "query_pre_attn_scalar": 256},
                    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152}},
    "llama-4-scout-17b-16e": {
        "model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {"model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48,
                        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                        "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 16,
                        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "attention_chunk_size": 8192,
                        "no_rope_layers": [], "use_qk_norm": True, "vocab_size": 202048,
                        "max_position_embeddings": 10485760, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
                        "tie_word_embeddings": False}},
    "llama-4-maverick-17b-128e": {
        "model_type": "llama4",
        "text_config": {"model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48,
                        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                        "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 128,
                        "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "attention_chunk_size": 8192,
                        "use_qk_norm": False, "vocab_size": 202048, "max_position_embeddings": 1048576,
                        "rope_theta": 500000.0, "rms_norm_eps": 1e-05}},
    "gpt-oss-20b": {"model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "num_local_experts": 32,
                    "num_experts_per_tok": 4, "vocab_size": 201088, "max_position_embeddings": 131072,
                    "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12,
                    "attention_bias": True, "tie_word_embeddings": False, "rope_theta": 150000,
                    "rms_norm_eps": 1e-05, "swiglu_limit": 7.0, "quantization_config": {"quant_method": "mxfp4"}},
    "phi-4": {"model_type": "phi3", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 10, "intermediate_size": 17920, "vocab_size": 100352,
              "max_position_embeddings": 16384, "rope_theta": 250000, "rms_norm_eps": 1e-05, "sliding_window": None,
              "tie_word_embeddings": False},
}
_IGNORED = {"name", "source", "published_params", "vision_params"}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_json_maps_to_the_library_entry(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS[name]))
    got = load_model(str(tmp_path)).to_dict()
    want = load_model(name).to_dict()
    for k in _IGNORED:
        got.pop(k), want.pop(k)
    assert got == want


def test_config_json_refuses_what_it_cannot_express():
    cfg = dict(HF_CONFIGS["qwen3-30b-a3b"], mlp_only_layers=[3, 7])
    with pytest.raises(PerfmodelError, match="mlp_only_layers"):
        model_from_hf_config(cfg)


def _fake_cache(root, repo_id, cfg, commit="0123abcd"):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_repo_id_resolves_from_the_local_cache(tmp_path, monkeypatch, env):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    hub = tmp_path / "hub"
    _fake_cache(hub, "google/gemma-2-9b", HF_CONFIGS["gemma-2-9b"])
    monkeypatch.setenv(env, str(hub if env == "HF_HUB_CACHE" else tmp_path))
    m = load_model("google/gemma-2-9b")
    assert m.name == "google/gemma-2-9b"
    assert m.param_count() == load_model("gemma-2-9b").param_count()
    assert m.layer_type_counts() == {"global": 21, "sliding": 21}


def test_repo_id_missing_from_the_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PerfmodelError, match=r"no config.json in the local Hugging Face cache.*huggingface-cli "
                                             r"download Qwen/Qwen3-8B config.json"):
        load_model("Qwen/Qwen3-8B")


def test_cli_resolves_a_cached_repo_id(tmp_path, monkeypatch, capsys):
    from perfmodel.cli.app import main

    _fake_cache(tmp_path, "microsoft/phi-4", HF_CONFIGS["phi-4"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["analyze", "--model", "microsoft/phi-4", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["kv_bytes_per_token"] == 204_800
    assert main(["analyze", "--model", "microsoft/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perfmodel: error: model: microsoft/not-cached has no config.json in the local Hugging Face "
                          "cache") and err.count("\n") == 1


def test_sweep_equals_step_by_step_with_mixed_layer_types():
    from perfmodel.costmodel.request import Workload, analyze
    from perfmodel.costmodel.sweep import sweep_arrays
    from perfmodel.specs import load_hardware

    hw = load_hardware("h100-sxm")
    # windows of 1024 and 128 tokens and chunks of 8192 crossed during decode
    batch, inp, out = np.array([1, 4, 2]), np.array([1000, 8100, 60]), np.array([200, 300, 100])
    for name in ("gemma-3-12b", "llama-4-scout-17b-16e", "gpt-oss-20b"):
        m = load_model(name)
        r = sweep_arrays(m, hw, batch, inp, out)
        for k in range(len(batch)):
            a = analyze(m, hw, Workload(int(batch[k]), int(inp[k]), int(out[k])))
            assert r["e2e_s"][k] == pytest.approx(a.request["e2e_s"], rel=1e-9)
            assert r["tpot_last_s"][k] == pytest.approx(a.request["tpot_last_s"], rel=1e-9)
            assert r["kv_cache_bytes"][k] == a.memory["kv_cache_bytes"]


@pytest.mark.parametrize("name", ["gemma-2-9b", "gemma-3-27b", "llama-4-maverick-17b-128e", "gpt-oss-120b", "qwen3-8b",
                                  "qwen3-30b-a3b", "phi-4"])
@pytest.mark.parametrize("batch,new,past", [(1, 1, 9000), (2, 300, 0), (1, 17, 8180)])
def test_fusion_composes_with_layer_types(name, batch, new, past):
    """Fused mode keeps one attention operator per layer type and moves no FLOP, weight or KV-history byte."""
    m = load_model(name)
    tot = lambda ops, f: sum(np.sum(getattr(o, f)) * o.layers for o in ops)  # noqa: E731
    eager = phase_ops(m, batch, new, past)
    fused = phase_ops(m, batch, new, past, exec_mode="fused")
    assert tot(fused, "flops") == tot(eager, "flops")
    assert tot(fused, "weight_bytes") == pytest.approx(tot(eager, "weight_bytes"), rel=1e-12)
    assert tot(fused, "kv_write_bytes") == tot(eager, "kv_write_bytes")
    attn = lambda ops: {o.name: o.layers for o in ops if o.kind == "attention"}  # noqa: E731
    assert attn(fused) == attn(eager)
    assert sum(attn(fused).values()) == m.num_layers
