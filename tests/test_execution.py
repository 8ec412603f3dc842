"""Execution modes (eager / graph / fused) and framework profiles in the cost model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from perfmodel.costmodel.execution import DEFAULT_EXEC, EXEC_MODES
from perfmodel.costmodel.operators import FLOPS_PER_ELEMENT, Precision, phase_ops
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.costmodel.sweep import sweep_arrays
from perfmodel.errors import PerfmodelError
from perfmodel.frameworks import apply_framework, list_frameworks, load_framework, resolve_runtime
from perfmodel.specs import load_hardware, load_model

H100 = dataclasses.replace(load_hardware("h100-sxm"), kernel_min_us=2.0, graph_launch_us=8.0)


def _tot(ops, field):
    return sum(float(np.sum(getattr(o, field))) * o.layers for o in ops)


def test_tpot_orders_eager_graph_fused_for_llama_8b_on_h100():
    m = load_model("llama-3.1-8b")
    tpot = {x: analyze(m, H100, Workload(1, 1024, 128), exec_mode=x).request["tpot_s"] for x in EXEC_MODES}
    assert tpot["eager"] > tpot["graph"] >= tpot["fused"]
    assert DEFAULT_EXEC == "fused"


@pytest.mark.parametrize("name", ["llama-3.1-8b", "gpt2", "mixtral-8x7b", "qwen2.5-7b", "mistral-7b", "deepseek-v3"])
@pytest.mark.parametrize("batch,new,past", [(1, 1, 99), (4, 1, 2000), (2, 300, 0), (1, 17, 40)])
def test_fusion_keeps_flops_and_weights_and_drops_only_intermediates(name, batch, new, past):
    """Fusing moves no weight and KV-history byte and adds no FLOP; it only stops writing and re-reading
    intermediates (and the new tokens' K/V are not re-read from the cache)."""
    m = load_model(name)
    eager = phase_ops(m, batch, new, past, flash=True)
    fused = phase_ops(m, batch, new, past, flash=True, exec_mode="fused")
    assert _tot(fused, "flops") == _tot(eager, "flops")
    # (MoE: expected experts touched is fractional, so merged gate/up rounds once where split rounds twice)
    assert _tot(fused, "weight_bytes") == pytest.approx(_tot(eager, "weight_bytes"), rel=1e-12)
    assert _tot(fused, "kv_write_bytes") == _tot(eager, "kv_write_bytes")
    assert _tot(fused, "kv_read_bytes") <= _tot(eager, "kv_read_bytes")
    moved = lambda ops: sum(_tot(ops, f) for f in ("act_read_bytes", "act_write_bytes"))  # noqa: E731
    assert moved(fused) < moved(eager)
    assert len(fused) < len(eager)


def test_fused_operator_bytes_by_hand():
    m = load_model("llama-3.1-8b")
    a, N, h, f, d = 2, 3, m.hidden_size, m.intermediate_size, m.head_dim
    nq, nkv, L, P = m.num_heads, m.num_kv_heads, m.num_layers, 100
    ops = {o.name: o for o in phase_ops(m, N, 1, P, exec_mode="fused")}
    gu = ops["gate_up_proj"]
    assert gu.weight_bytes == 2 * h * f * a and gu.act_write_bytes == N * f * a and gu.act_read_bytes == N * h * a
    assert gu.flops == 2 * N * h * 2 * f + N * f * FLOPS_PER_ELEMENT["silu_mul"]
    an = ops["add_norm"]
    assert an.layers == 2 * L - 1 and ops["attn_norm"].layers == 1 and ops["mlp_residual"].layers == 1
    assert an.act_read_bytes == 2 * N * h * a and an.act_write_bytes == 2 * N * h * a
    att = ops["attention"]
    assert att.kv_read_bytes == N * P * 2 * nkv * d * a and att.kv_write_bytes == N * 2 * nkv * d * a
    assert att.act_read_bytes == N * (nq + 2 * nkv) * d * a + 2 * N * d * a
    assert "rope" not in ops and "kv_write" not in ops and "q_proj" not in ops
    assert ops["qkv_proj"].weight_bytes == h * (nq + 2 * nkv) * d * a


@pytest.mark.parametrize("mode", EXEC_MODES)
def test_sweep_equals_step_by_step_analysis_in_every_mode(mode):
    m = load_model("mistral-7b")  # sliding window: a break in the decode cost's slope
    rng = np.random.default_rng(3)
    b, i, o = rng.integers(1, 64, 8), rng.integers(1, 6000, 8), rng.integers(1, 3000, 8)
    r = sweep_arrays(m, H100, b, i, o, exec_mode=mode)
    for k in range(8):
        q = analyze(m, H100, Workload(int(b[k]), int(i[k]), int(o[k])), exec_mode=mode).request
        assert r["e2e_s"][k] == pytest.approx(q["e2e_s"], rel=1e-9)
        assert r["tpot_first_s"][k] == pytest.approx(q["tpot_first_s"], rel=1e-9)


def test_graph_mode_kernels_cost_at_least_their_minimum():
    m = load_model("smollm2-135m")
    a = analyze(m, H100, Workload(1, 16, 4), exec_mode="graph")
    per_op = [t for t in a.decode if t.op.kind != "host"]
    assert all(np.all(t.time_s >= 2e-6) for t in per_op)
    assert any(str(np.asarray(t.bound).reshape(-1)[0]) == "latency" for t in per_op)
    host = [t for t in a.decode if t.op.kind == "host"]
    assert [t.op.name for t in host] == ["graph_launch"] and host[0].time_s == pytest.approx(8e-6)


def test_framework_profiles_load_and_name_a_mode():
    names = {f.name for f in list_frameworks()}
    assert {"vllm", "sglang", "tensorrt-llm", "llama.cpp", "transformers"} <= names
    for f in list_frameworks():
        assert f.exec_mode in EXEC_MODES and f.provenance.get("exec")
    assert load_framework("transformers").exec_mode == "eager"


def test_resolve_runtime_precedence_and_effects():
    hw, mode, prof = resolve_runtime(H100, None, None)
    assert mode == DEFAULT_EXEC and prof is None and hw is H100
    hw, mode, prof = resolve_runtime(H100, None, "transformers")
    assert mode == "eager" and hw.host_overhead_us == prof.host_overhead_for(H100) > 0
    assert resolve_runtime(H100, "graph", "transformers")[1] == "graph"
    with pytest.raises(PerfmodelError, match="--exec"):
        resolve_runtime(H100, "turbo", None)
    with pytest.raises(PerfmodelError, match="--framework"):
        resolve_runtime(H100, None, "nope")


def test_framework_multipliers_scale_efficiency(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nexec: fused\nhost_overhead_us: {default: 0}\n"
                 "efficiency:\n  default: {memory: 0.5, kinds: {matmul: {compute: 0.5}}}\n"
                 "provenance: {exec: test}\n")
    prof = load_framework(str(p))
    hw = apply_framework(H100, prof)
    assert hw.efficiency.memory == pytest.approx(H100.efficiency.memory * 0.5)
    assert hw.efficiency.kind_compute["matmul"] == pytest.approx(0.5)
    m = load_model("llama-3.1-8b")
    slow = analyze(m, hw, Workload(1, 512, 8)).request
    fast = analyze(m, H100, Workload(1, 512, 8)).request
    assert slow["tpot_s"] > 1.8 * fast["tpot_s"]  # decode is memory-bound: half the bandwidth, about twice the time


def test_host_overhead_per_step_enters_ttft_and_tpot():
    m = load_model("llama-3.1-8b")
    base = analyze(m, H100, Workload(1, 512, 16)).request
    hw = dataclasses.replace(H100, host_overhead_us=500.0)
    slow = analyze(m, hw, Workload(1, 512, 16)).request
    assert slow["tpot_s"] - base["tpot_s"] == pytest.approx(500e-6)
    assert slow["ttft_s"] - base["ttft_s"] == pytest.approx(500e-6)


def test_cli_exec_and_framework(capsys):
    import json

    from perfmodel.cli.app import main

    assert main(["analyze", "--framework", "vllm", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["exec_mode"] == "fused" and d["framework"] == "vllm"
    assert main(["analyze", "--exec", "warp"]) == 2
    assert "--exec" in capsys.readouterr().err
    assert main(["frameworks", "--format", "csv"]) == 0
    assert "tensorrt-llm" in capsys.readouterr().out


def test_framework_precision_checks_formats_and_picks_native_compute():
    from perfmodel.frameworks import framework_precision

    p = Precision("fp8", "bf16", "bf16")
    assert framework_precision(p, H100, load_framework("vllm")).compute_dtype == "fp8"  # native fp8 GEMMs
    a100 = load_hardware("a100-80gb")  # no fp8 tensor cores: a dequantising GEMM at bf16
    assert framework_precision(p, a100, load_framework("vllm")).compute_dtype == "bf16"
    with pytest.raises(PerfmodelError, match="llama.cpp"):
        framework_precision(p, H100, load_framework("llama.cpp"))
    assert framework_precision(p, H100, None) is p
