"""Properties of the cost model over generated workloads (hypothesis): monotone in the workload, never
faster than the roofline allows, KV bytes in closed form, and the same figures in table, JSON and CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perfmodel.cli.app import main
from perfmodel.costmodel.operators import Precision, kv_cache_bytes
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.output import seconds
from perfmodel.specs import load_hardware, load_model

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODELS = ["llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "gpt2", "gemma-2-9b", "deepseek-v3", "qwen3-30b-a3b"]
HW = ["h100-sxm", "a100-80gb", "l4", "mi300x", "epyc-9654"]
DTYPES = [("bf16", "bf16", "bf16"), ("fp8", "bf16", "fp8"), ("int4", "bf16", "bf16"), ("q4_k", "fp16", "q8_0")]
EXEC = ["eager", "graph", "fused"]

batch = st.integers(1, 512)
tokens = st.integers(1, 32768)
out_tokens = st.integers(1, 2048)
grow = st.integers(1, 4096)


def _figures(m, hw, p, mode, b, i, o):
    a = analyze(load_model(m), load_hardware(hw), Workload(b, i, o), Precision(*p), exec_mode=mode)
    q, mem = a.request, a.memory
    return {"ttft": q["ttft_s"], "e2e": q["e2e_s"], "tpot_last": q["tpot_last_s"],
            "prefill_bytes": a.prefill_summary["bytes"], "prefill_flops": a.prefill_summary["flops"],
            "decode_bytes": a.decode_summary["bytes"], "kv": mem["kv_cache_bytes"]}, a


def _not_below(hi: dict, lo: dict, keys, what: str) -> None:
    for k in keys:
        assert hi[k] >= lo[k] * (1 - 1e-12), f"{k} fell from {lo[k]} to {hi[k]} when {what} grew"


@FAST
@given(m=st.sampled_from(MODELS), hw=st.sampled_from(HW), p=st.sampled_from(DTYPES), mode=st.sampled_from(EXEC),
       b=batch, i=tokens, o=out_tokens, db=grow)
def test_monotone_in_batch(m, hw, p, mode, b, i, o, db):
    lo, _ = _figures(m, hw, p, mode, b, i, o)
    hi, _ = _figures(m, hw, p, mode, b + db, i, o)
    _not_below(hi, lo, ("ttft", "e2e", "tpot_last", "prefill_bytes", "prefill_flops", "decode_bytes", "kv"), "batch")


@FAST
@given(m=st.sampled_from(MODELS), hw=st.sampled_from(HW), p=st.sampled_from(DTYPES), mode=st.sampled_from(EXEC),
       b=batch, i=tokens, o=out_tokens, di=grow)
def test_monotone_in_input(m, hw, p, mode, b, i, o, di):
    lo, _ = _figures(m, hw, p, mode, b, i, o)
    hi, _ = _figures(m, hw, p, mode, b, i + di, o)
    _not_below(hi, lo, ("ttft", "e2e", "tpot_last", "prefill_bytes", "prefill_flops", "decode_bytes", "kv"), "input")


@FAST
@given(m=st.sampled_from(MODELS), hw=st.sampled_from(HW), p=st.sampled_from(DTYPES), mode=st.sampled_from(EXEC),
       b=batch, i=tokens, o=out_tokens, do=grow)
def test_monotone_in_output(m, hw, p, mode, b, i, o, do):
    lo, _ = _figures(m, hw, p, mode, b, i, o)
    hi, _ = _figures(m, hw, p, mode, b, i, o + do)
    _not_below(hi, lo, ("ttft", "e2e", "tpot_last", "prefill_bytes", "decode_bytes", "kv"), "output")


def _ideal(hw):
    """The same machine at efficiency 1 with no launch, dispatch or host cost: the pure roofline."""
    eff = dataclasses.replace(hw.efficiency, compute=1.0, memory=1.0, matmul_half_dim=0.0, matmul_half_bytes=0.0,
                              op_overhead_us=0.0, elementwise_memory=None, kind_overhead_us={},
                              op_overhead_map_us={}, step_overhead_us=0.0, layer_overhead_us=0.0)
    return dataclasses.replace(hw, efficiency=eff, launch_overhead_us=0.0, kernel_min_us=0.0, graph_launch_us=0.0,
                               host_overhead_us=0.0)


@FAST
@given(m=st.sampled_from(MODELS), hwn=st.sampled_from(HW), p=st.sampled_from(DTYPES), mode=st.sampled_from(EXEC),
       eff=st.sampled_from(["nominal", "optimistic", "pessimistic"]), b=batch, i=tokens, o=out_tokens)
def test_ttft_and_tpot_never_below_the_pure_roofline(m, hwn, p, mode, eff, b, i, o):
    model, hw = load_model(m), load_hardware(hwn).with_efficiency(eff)
    w, prec = Workload(b, i, o), Precision(*p)
    real = analyze(model, hw, w, prec, exec_mode=mode)
    ideal = analyze(model, _ideal(hw), w, prec, exec_mode=mode)
    assert real.request["ttft_s"] >= ideal.request["ttft_s"] * (1 - 1e-12)
    assert real.request["tpot_s"] >= ideal.request["tpot_s"] * (1 - 1e-12)
    # and the ideal itself is no faster than all FLOPs at the machine's highest peak, or all bytes at its
    # fastest memory level (each operator takes at least both; summing keeps the larger)
    top_flops = max(hw.peak_tflops.values()) * 1e12
    top_bw = max([hw.memory_bandwidth_gbps, *(lv.bandwidth_gbps for lv in hw.memory_levels)]) * 1e9
    pre = real.prefill_summary
    floor = max(pre["flops"] / top_flops, pre["bytes"] / top_bw)
    assert ideal.request["ttft_s"] >= floor * (1 - 1e-9)
    if o > 1:
        dec = real.decode_summary
        step_floor = max(dec["flops"] / top_flops, dec["bytes"] / top_bw) / (o - 1)
        assert ideal.request["tpot_s"] >= step_floor * (1 - 1e-9)


GLOBAL_ONLY = [m for m in ("llama-3.1-8b", "llama-2-7b", "qwen2.5-7b", "gemma-7b", "smollm2-135m", "mixtral-8x7b",
                           "llama-3.1-405b", "gpt2")]
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


@FAST
@given(m=st.sampled_from(GLOBAL_ONLY), kv=st.sampled_from(sorted(KV_BYTES)), b=st.integers(1, 4096),
       t=st.integers(1, 2**24))
def test_kv_bytes_follow_the_closed_form(m, kv, b, t):
    model = load_model(m)
    assert set(model.layer_type_counts()) == {"global"} and not model.is_mla
    closed = 2 * model.num_layers * model.num_kv_heads * model.head_dim * t * KV_BYTES[kv] * b
    assert int(kv_cache_bytes(model, t, b, kv)) == closed
    if t > 1:
        a = analyze(model, load_hardware("h100-sxm"), Workload(b, t - 1, 1), Precision("bf16", "bf16", kv))
        assert a.memory["kv_cache_bytes"] == closed


def _run(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.sampled_from(["llama-3.1-8b", "mixtral-8x7b", "gpt2"]), b=st.integers(1, 64), i=st.integers(1, 8192),
       o=st.integers(1, 512))
def test_units_agree_between_table_json_and_csv(m, b, i, o, capsys):
    args = ["analyze", "--model", m, "--batch", str(b), "--input", str(i), "--output", str(o)]
    d = json.loads(_run(args + ["--format", "json"], capsys))
    rows = list(csv.DictReader(io.StringIO(_run(args + ["--format", "csv"], capsys))))
    assert len(rows) == len(d["ops"])
    for r, j in zip(rows, d["ops"]):
        assert r["op"] == j["op"] and r["phase"] == j["phase"]
        for k in ("flops", "bytes", "time_s", "kv_bytes"):
            assert float(r[k]) == pytest.approx(j[k], rel=1e-12)  # seconds and bytes in both, not ms or GB
    table = " ".join(_run(args, capsys).split())
    q = d["request"]
    assert f"TTFT {seconds(q['ttft_s'])}" in table and f"end-to-end {seconds(q['e2e_s'])}" in table
    # the sweep's rows: the same request figures in JSON and CSV, and as analyze gives them
    sw = ["sweep", "--model", m, "--batch", str(b), "--input", str(i), "--output", str(o)]
    sj = json.loads(_run(sw + ["--format", "json"], capsys))[0]
    sc = next(csv.DictReader(io.StringIO(_run(sw + ["--format", "csv"], capsys))))
    for k in ("ttft_s", "tpot_s", "e2e_s", "tokens_per_s", "kv_cache_bytes"):
        assert float(sc[k]) == pytest.approx(sj[k], rel=1e-12)
    assert sj["ttft_s"] == pytest.approx(q["ttft_s"], rel=1e-9)
    assert sj["e2e_s"] == pytest.approx(q["e2e_s"], rel=1e-9)
    assert sj["kv_cache_bytes"] == pytest.approx(d["memory"]["kv_cache_bytes"], rel=1e-12)
