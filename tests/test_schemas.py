"""Schemas at the input boundaries: one line naming the file, the field path and what is allowed."""

import copy
import dataclasses
import json

import pytest
import yaml

from perfmodel.errors import PerfmodelError
from perfmodel.specs.hardware import HardwareSpec, hardware_from_dict, load_hardware
from perfmodel.specs.model import ModelSchema, ModelSpec, load_model, model_from_hf_config

H100 = yaml.safe_load(open(load_hardware("h100-sxm").path))


def _hw_error(mutate) -> str:
    d = copy.deepcopy(H100)
    mutate(d)
    with pytest.raises(PerfmodelError) as e:
        hardware_from_dict(d, "h100.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_hardware_errors_name_file_field_and_range():
    assert _hw_error(lambda d: d["memory"].update(bandwidth_gbps=-5)) == \
        "h100.yaml: memory.bandwidth_gbps: must be a finite number > 0, got -5"
    assert _hw_error(lambda d: d["memory"].update(bandwidth_gbps=float("nan"))).endswith("got nan")
    assert "peak_tflops.bf16: must be a finite number > 0, got inf" in _hw_error(
        lambda d: d["peak_tflops"].update(bf16=float("inf")))
    assert "interconnect.bandwidth_gbps" in _hw_error(lambda d: d["interconnect"].update(bandwidth_gbps=-8))
    assert "efficiency.optimistic.compute: must be a finite number in (0, 1]" in _hw_error(
        lambda d: d["efficiency"]["optimistic"].update(compute=1.5))
    assert "memory.bandwith_gbps: unknown field" in _hw_error(lambda d: d["memory"].update(bandwith_gbps=1))
    assert "memory.capacity_gb: required field missing" in _hw_error(lambda d: d["memory"].pop("capacity_gb"))
    assert "price_per_hour_usd: must be a finite number >= 0" in _hw_error(lambda d: d.update(price_per_hour_usd=-1))
    assert "host_overhead_us" in _hw_error(lambda d: d.update(host_overhead_us="fast"))


def test_hardware_memory_levels_validated_and_built():
    levels = [{"name": "L2", "capacity_mb": 50, "bandwidth_gbps": 12000},
              {"name": "SMEM", "capacity_mb": 30, "bandwidth_gbps": 30000}]
    assert "memory.levels: must be listed smallest first" in _hw_error(lambda d: d["memory"].update(levels=levels))
    assert "memory.levels[0].bandwidth_gbps" in _hw_error(
        lambda d: d["memory"].update(levels=[{"name": "L2", "capacity_mb": 50, "bandwidth_gbps": 0}]))
    d = copy.deepcopy(H100)
    d["memory"]["levels"] = levels[::-1]
    d.update(kernel_min_us=2.5, graph_launch_us=8, host_overhead_us=30)
    hw = hardware_from_dict(d)
    assert [lv.name for lv in hw.memory_levels] == ["SMEM", "L2"]
    assert hw.memory_levels[1].capacity_bytes == 50 * 2**20
    assert (hw.kernel_min_us, hw.graph_launch_us, hw.host_overhead_us) == (2.5, 8.0, 30.0)


def test_skinny_row_table_validated():
    assert "efficiency.skinny_rows" in _hw_error(lambda d: d.setdefault("efficiency", {}).update(skinny_rows={0: 1.2}))
    assert "efficiency.skinny_rows" in _hw_error(lambda d: d.setdefault("efficiency", {}).update(skinny_rows={4: -1}))
    d = copy.deepcopy(H100)
    d.setdefault("efficiency", {})["skinny_rows"] = {2: 1.1, 8: 1.0}
    assert hardware_from_dict(d).efficiency.skinny_rows == {2: 1.1, 8: 1.0}


def test_every_hardware_spec_field_is_in_the_schema():
    """A field added to HardwareSpec must be readable from YAML (or built from a nested block)."""
    from perfmodel.specs.hardware import HardwareSchema

    built = {"memory_capacity_gb", "memory_bandwidth_gbps", "memory_type", "memory_levels", "optimistic",
             "pessimistic", "path"}
    missing = {f.name for f in dataclasses.fields(HardwareSpec)} - built - set(HardwareSchema.model_fields)
    assert not missing


def test_model_schema_follows_the_dataclass():
    assert set(ModelSchema.model_fields) == {f.name for f in dataclasses.fields(ModelSpec)}


@pytest.mark.parametrize("cfg,needle", [
    ([1, 2], "expected a JSON object"),
    ({"model_type": "llama", "hidden_size": "wide"}, "num_hidden_layers: required field missing"),
    ({"model_type": "gpt2", "n_embd": -1, "n_layer": 2, "n_head": 2, "vocab_size": 10}, "n_embd: must be an integer"),
    ({"model_type": 7}, "model_type: must be a string"),
])
def test_hf_config_errors(cfg, needle):
    with pytest.raises(PerfmodelError, match=needle):
        model_from_hf_config(cfg)


def test_model_file_errors(tmp_path):
    p = tmp_path / "config.json"
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 100}
    for bad, needle in ((dict(hidden_size=10**30), "hidden_size: must be an integer in [1, 131072]"),
                        (dict(rms_norm_eps=float("nan")), "rms_norm_eps: must be a finite number in (0, 1)"),
                        (dict(num_key_value_heads=8), "num_key_value_heads: must be <= num_heads"),
                        (dict(tie_word_embeddings="no"), "tie_word_embeddings: must be true or false")):
        p.write_text(json.dumps({**base, **bad}))
        with pytest.raises(PerfmodelError) as e:
            load_model(str(p))
        assert needle in str(e.value) and str(p) in str(e.value)
    y = tmp_path / "m.yaml"
    y.write_text("family: llama\nhidden_size: 64\nnum_layers: 2\nnum_heads: 4\nintermediate_size: 128\n"
                 "vocab_size: .nan\n")
    with pytest.raises(PerfmodelError, match="vocab_size: must be an integer"):
        load_model(str(y))
    y.write_text("- a list\n")
    with pytest.raises(PerfmodelError, match="expected a YAML mapping"):
        load_model(str(y))


@pytest.mark.parametrize("name", ["x" * 5000, "a\0b", "/"])
def test_unusable_names_are_one_clean_line(name):
    for load in (load_model, load_hardware):
        with pytest.raises(PerfmodelError) as e:
            load(name)
        assert len(str(e.value)) < 1000
