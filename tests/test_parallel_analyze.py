"""analyze under tensor / pipeline / expert parallelism: per-device operators, collectives as operators."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perfmodel.costmodel.operators import Precision, weight_memory_bytes
from perfmodel.costmodel.parallel import Parallelism, ring_allreduce_s
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.costmodel.sweep import sweep_arrays
from perfmodel.specs import load_hardware, load_model

H100 = load_hardware("h100-sxm")


def test_405b_fp8_fits_on_tp8_h100_with_per_gpu_figures(capsys):
    from perfmodel.cli.app import main

    assert main(["analyze", "--tp", "8", "--model", "llama-3.1-405b", "--hardware", "h100-sxm", "--weight-dtype",
                 "fp8", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    m = load_model("llama-3.1-405b")
    assert d["memory"]["fits"] and d["memory"]["devices"] == 8
    assert d["memory"]["weights_bytes"] == pytest.approx(weight_memory_bytes(m, Precision("fp8", "bf16", "bf16")) / 8,
                                                         rel=1e-9)
    ops = {(r["phase"], r["op"]): r for r in d["ops"]}
    assert ops[("decode", "tp_allreduce")]["bound"] == "interconnect"
    assert main(["analyze", "--model", "llama-3.1-405b", "--hardware", "h100-sxm", "--weight-dtype", "fp8",
                 "--format", "json"]) == 0
    assert not json.loads(capsys.readouterr().out)["memory"]["fits"]  # one GPU cannot hold it


def test_collectives_are_operators_with_the_ring_formula():
    m = load_model("llama-3.1-70b")
    a = analyze(m, H100, Workload(4, 256, 8), parallelism=Parallelism(tp=4))
    ar = [t for t in a.decode if t.op.name == "tp_allreduce"][0]
    hidden = 4 * m.hidden_size * 2
    assert ar.op.layers == 2 * m.num_layers
    assert float(ar.time_s) == pytest.approx(float(ring_allreduce_s(hidden, 4, H100)))
    one = analyze(m, H100, Workload(4, 256, 8))
    assert a.request["tpot_s"] < one.request["tpot_s"] / 2  # a quarter of the weights per device, plus the link
    q1 = {t.op.name: t for t in one.decode}["qkv_proj"]
    q4 = {t.op.name: t for t in a.decode}["qkv_proj"]
    assert float(np.sum(q4.op.weight_bytes)) == pytest.approx(float(np.sum(q1.op.weight_bytes)) / 4)


def test_pipeline_and_expert_parallel_collectives_and_memory():
    m = load_model("mixtral-8x7b")
    base = analyze(m, H100, Workload(2, 128, 4))
    a = analyze(m, H100, Workload(2, 128, 4), parallelism=Parallelism(tp=2, pp=2, ep=4))
    names = {t.op.name for t in a.decode}
    assert {"tp_allreduce", "pp_send", "ep_all_to_all"} <= names
    assert a.memory["kv_cache_bytes"] == pytest.approx(base.memory["kv_cache_bytes"] / 4, rel=1e-6)
    assert a.memory["weights_bytes"] < base.memory["weights_bytes"] / 4
    assert a.memory["devices"] == 2 * 2 * 4  # expert parallelism beyond tp adds devices (Parallelism.devices)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_sweep_with_tp_equals_analyze(tp):
    m = load_model("llama-3.1-8b")
    rng = np.random.default_rng(5)
    b, i, o = rng.integers(1, 32, 6), rng.integers(1, 4000, 6), rng.integers(2, 500, 6)
    r = sweep_arrays(m, H100, b, i, o, parallelism=Parallelism(tp=tp))
    for k in range(6):
        q = analyze(m, H100, Workload(int(b[k]), int(i[k]), int(o[k])), parallelism=Parallelism(tp=tp))
        assert r["e2e_s"][k] == pytest.approx(q.request["e2e_s"], rel=1e-9)
        assert r["weights_bytes"][k] == pytest.approx(q.memory["weights_bytes"], rel=1e-9)
