import json

import pytest

from perfmodel.costmodel.operators import kv_bytes_per_token_layer
from perfmodel.dtypes import tensor_bytes
from perfmodel.errors import PerfmodelError
from perfmodel.specs import list_hardware, list_models, load_hardware, load_model


@pytest.mark.parametrize("model", [m.name for m in list_models()])
def test_parameter_count_within_one_percent_of_published(model):
    m = load_model(model)
    assert abs(m.param_count() / m.published_params - 1) < 0.01


@pytest.mark.parametrize("name,expected", [("llama-2-7b", 524_288), ("llama-3.1-8b", 131_072),
                                           ("smollm2-135m", 23_040)])
def test_kv_bytes_per_token_fp16_closed_form(name, expected):
    m = load_model(name)
    assert m.num_layers * kv_bytes_per_token_layer(m, "fp16") == expected
    assert expected == 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2


def test_mla_caches_latent_not_full_kv():
    m = load_model("deepseek-v3")
    assert m.attention_kind == "MLA"
    assert m.num_layers * kv_bytes_per_token_layer(m, "bf16") == 61 * (512 + 64) * 2
    full = 2 * m.num_layers * m.num_heads * m.v_head_dim * 2
    assert m.num_layers * kv_bytes_per_token_layer(m, "bf16") < full / 50


def test_attention_kinds_and_head_dim():
    assert load_model("llama-2-7b").attention_kind == "MHA"
    assert load_model("llama-3.1-8b").attention_kind == "GQA"
    gemma = load_model("gemma-7b")
    assert gemma.head_dim == 256 != gemma.hidden_size // gemma.num_heads
    mqa = load_model("llama-2-7b").replace(name="mqa", num_kv_heads=1)
    assert mqa.attention_kind == "MQA"


def test_moe_active_params():
    m = load_model("mixtral-8x7b")
    assert abs(m.param_count(active=True) / 12.9e9 - 1) < 0.01  # the model card's 12.9B active


def test_int_formats_count_their_scales():
    assert tensor_bytes(128, "int4") == 64 + 2
    assert tensor_bytes(256, "int8") == 256 + 4
    assert tensor_bytes(100, "bf16") == 200


def test_load_hf_config_json(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}
    d = tmp_path / "smol"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d))
    ref = load_model("smollm2-135m")
    assert m.param_count() == ref.param_count()
    assert m.kv_elements_per_token == ref.kv_elements_per_token
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    (tmp_path / "gpt2.json").write_text(json.dumps(gpt2))
    assert load_model(str(tmp_path / "gpt2.json")).param_count() == load_model("gpt2").param_count()


def test_yaml_model_and_errors(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text("family: llama\nhidden_size: 64\nnum_layers: 2\nnum_heads: 4\nnum_kv_heads: 2\n"
                 "intermediate_size: 128\nvocab_size: 100\n")
    assert load_model(str(p)).head_dim == 16
    p.write_text("family: llama\nhidden_size: [64\n")
    with pytest.raises(PerfmodelError, match="malformed YAML"):
        load_model(str(p))
    p.write_text("family: llama\nhidden_size: 64\nnum_layers: 2\nnum_heads: 4\nnum_kv_heads: 3\n"
                 "intermediate_size: 128\nvocab_size: 100\n")
    with pytest.raises(PerfmodelError, match="num_kv_heads"):
        load_model(str(p))
    with pytest.raises(PerfmodelError, match="allowed"):
        load_model("no-such-model")


def test_hardware_library_complete_and_dense():
    names = {h.name for h in list_hardware()}
    for n in ("h100-sxm", "h100-pcie", "h200", "b200", "a100-40gb", "a100-80gb", "l4", "l40s", "rtx-4090",
              "mi300x", "tpu-v5e", "m2-ultra", "cpu-template"):
        assert n in names
    h100 = load_hardware("h100-sxm")
    assert h100.peak_tflops["bf16"] == pytest.approx(989.4)  # dense, not the 1979 sparsity figure
    for h in list_hardware():
        assert h.sources.get("datasheet"), h.name
        assert 0 < h.efficiency.compute <= 1 and 0 < h.efficiency.memory <= 1


def test_bad_hardware_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\npeak_tflops: {bf16: 1}\n")
    with pytest.raises(PerfmodelError, match="memory"):
        load_hardware(str(p))
