import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfmodel.costmodel.operators import (ATTN_BLOCK, Precision, attended_pairs, blocked_scores,
                                           expected_experts_touched, kv_cache_bytes, phase_ops)
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.costmodel.roofline import op_timings, phase_summary
from perfmodel.costmodel.sweep import sweep_arrays
from perfmodel.specs import load_hardware, load_model

H100 = load_hardware("h100-sxm")


def _flops(ops):
    return sum(int(np.sum(o.flops)) * o.layers for o in ops)


@pytest.mark.parametrize("past,new,window", [(0, 1, None), (0, 7, None), (5, 3, None), (0, 10, 4), (3, 9, 4),
                                             (20, 1, 8), (6, 1, 8), (0, 33, 32)])
def test_attended_pairs_equal_causal_mask_count(past, new, window):
    q = np.arange(past, past + new)[:, None]
    k = np.arange(past + new)[None, :]
    mask = k <= q
    if window:
        mask &= k > q - window
    assert attended_pairs(past, new, window) == mask.sum()


def test_causal_prefill_is_about_half_of_full_square():
    m = load_model("llama-2-7b")
    attn = [o for o in phase_ops(m, 1, 4096, 0) if o.name == "attention"][0]
    full = m.num_heads * 4096 * 4096 * (4 * m.head_dim + 5)
    assert attn.flops == m.num_heads * (4096 * 4097 // 2) * (4 * m.head_dim + 5)
    assert 0.5 < attn.flops / full < 0.5002


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-8b", "smollm2-135m", "gpt2", "qwen2.5-7b"])
def test_decode_flops_are_two_per_matmul_param_plus_attention(name):
    m = load_model(name)
    ctx = 1000
    ops = phase_ops(m, 1, 1, ctx - 1)
    attn = m.num_layers * m.num_heads * ctx * (2 * m.head_dim + 2 * m.head_dim + 5)
    expected = 2 * m.matmul_params() + attn
    assert abs(_flops(ops) / expected - 1) < 0.01


def test_moe_decode_flops_use_active_experts_only():
    m = load_model("mixtral-8x7b")
    ops = phase_ops(m, 1, 1, 99)
    attn = m.num_layers * m.num_heads * 100 * (4 * m.head_dim + 5)
    assert abs(_flops(ops) / (2 * m.matmul_params(active=True) + attn) - 1) < 0.01


def test_prefill_compute_bound_decode_memory_bound():
    m = load_model("llama-2-7b")
    a = analyze(m, H100, Workload(1, 2048, 128))
    assert a.prefill_summary["bound"] == "compute"
    assert a.decode_summary["bound"] == "memory"


def test_flash_attention_removes_score_traffic_exactly():
    m = load_model("llama-2-7b")
    B, T = 2, 512
    flash = phase_ops(m, B, T, 0, flash=True)
    naive = phase_ops(m, B, T, 0, flash=False)
    b = lambda ops: sum(int(o.bytes) * o.layers for o in ops)  # noqa: E731
    score_elems, key_reads = blocked_scores(0, T)
    # the blocked causal kernel materialises about half the square (whole blocks on the diagonal)
    assert T * (T + 1) // 2 <= score_elems < T * (T + 1) // 2 + T * ATTN_BLOCK
    score_bytes = B * m.num_heads * score_elems * 2
    kv_rereads = B * (key_reads - T) * 2 * m.num_kv_heads * m.head_dim * 2
    # QK^T writes the scores, softmax reads and writes them, attention*V reads them: 4 passes; each query
    # block also re-reads the K/V band it sees, where FlashAttention reads K/V once
    assert b(naive) - b(flash) == (4 * score_bytes + kv_rereads) * m.num_layers
    assert _flops(naive) == _flops(flash)


@pytest.mark.parametrize("past,new,window", [(0, 1, None), (0, 300, None), (17, 129, None), (0, 300, 100),
                                             (50, 200, 64), (1000, 1, 64)])
def test_blocked_scores_match_block_walk(past, new, window):
    scores, keys = 0, 0
    for r0 in range(0, new, ATTN_BLOCK):
        r1 = min(new, r0 + ATTN_BLOCK)
        lo = max(0, past + r0 - window + 1) if window else 0
        scores += (r1 - r0) * (past + r1 - lo)
        keys += past + r1 - lo
    assert blocked_scores(past, new, window) == (scores, keys)


def test_moe_reads_distinct_experts():
    m = load_model("mixtral-8x7b")
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(8, 2, 64) == pytest.approx(8, rel=1e-6)
    rng = np.random.default_rng(0)
    sims = [len(np.unique(np.concatenate([rng.choice(8, 2, replace=False) for _ in range(4)]))) for _ in range(4000)]
    assert expected_experts_touched(8, 2, 4) == pytest.approx(np.mean(sims), rel=0.02)
    w = lambda B: sum(float(np.sum(o.weight_bytes)) * o.layers  # noqa: E731
                      for o in phase_ops(m, B, 1, 100) if o.name.startswith("expert_"))
    per_expert = 3 * m.hidden_size * m.intermediate_size * 2 * m.moe_layers
    assert w(1) == pytest.approx(2 * per_expert)
    assert w(4) == pytest.approx(expected_experts_touched(8, 2, 4) * per_expert)
    assert w(256) == pytest.approx(8 * per_expert, rel=1e-6)


def test_sliding_window_caps_cache_and_attention():
    m = load_model("mistral-7b")
    assert kv_cache_bytes(m, 8192) == kv_cache_bytes(m, 4096) == kv_cache_bytes(m, 4096 + 1)
    a1 = [o for o in phase_ops(m, 1, 1, 10_000) if o.name == "attention"][0]
    a2 = [o for o in phase_ops(m, 1, 1, 20_000) if o.name == "attention"][0]
    assert a1.flops == a2.flops and a1.kv_read_bytes == a2.kv_read_bytes


def test_kv_cache_bytes_formula():
    m = load_model("llama-3.1-8b")
    a = analyze(m, H100, Workload(4, 1000, 24), Precision("bf16", "bf16", "fp8"))
    assert a.memory["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 1024 * 1 * 4


@pytest.mark.parametrize("name", ["llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "deepseek-v3", "gpt2"])
def test_sweep_equals_step_by_step_analysis(name):
    m = load_model(name)
    rng = np.random.default_rng(1)
    b, i, o = rng.integers(1, 64, 12), rng.integers(1, 6000, 12), rng.integers(1, 3000, 12)
    r = sweep_arrays(m, H100, b, i, o)
    for k in range(12):
        q = analyze(m, H100, Workload(int(b[k]), int(i[k]), int(o[k]))).request
        assert r["e2e_s"][k] == pytest.approx(q["e2e_s"], rel=1e-9)
        assert r["ttft_s"][k] == pytest.approx(q["ttft_s"], rel=1e-9)
        assert r["tpot_last_s"][k] == pytest.approx(q["tpot_last_s"], rel=1e-9)


def test_mla_decode_reads_latent_cache():
    m = load_model("deepseek-v3")
    ops = {o.name: o for o in phase_ops(m, 1, 1, 999)}
    assert "q_absorb" in ops and "kv_b_proj" not in ops
    assert ops["attention"].kv_read_bytes == 1000 * (512 + 64) * 2
    pre = {o.name for o in phase_ops(m, 1, 100, 0)}
    assert "kv_b_proj" in pre


def _req(name, batch, inp, out):
    a = analyze(load_model(name), H100, Workload(batch, inp, out))
    return a.request["e2e_s"], a.request["ttft_s"], a.memory["total_bytes"]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["llama-3.1-8b", "mixtral-8x7b", "mistral-7b", "gpt2", "deepseek-v2"]),
       batch=st.integers(1, 64), inp=st.integers(1, 5000), out=st.integers(1, 300),
       dim=st.sampled_from(["batch", "inp", "out"]), step=st.integers(1, 500))
def test_time_and_memory_never_decrease_as_work_grows(name, batch, inp, out, dim, step):
    base = dict(batch=batch, inp=inp, out=out)
    grown = dict(base)
    grown[dim] += step
    e0, t0, m0 = _req(name, base["batch"], base["inp"], base["out"])
    e1, t1, m1 = _req(name, grown["batch"], grown["inp"], grown["out"])
    assert e1 >= e0 * (1 - 1e-12)
    assert t1 >= t0 * (1 - 1e-12)
    assert m1 >= m0


def test_phase_summary_sums_ops():
    m = load_model("smollm2-135m")
    p = Precision("fp32", "fp32", "fp32")
    ops = phase_ops(m, 2, 16, 0, p)
    s = phase_summary(op_timings(ops, H100, p))
    assert s["flops"] == sum(o.flops * o.layers for o in ops)


def test_skinny_row_table_scales_only_skinny_weight_streams():
    import dataclasses

    from perfmodel.costmodel.roofline import skinny_row_factor

    table = {m: 1.0 for m in range(2, 17)} | {6: 1.5, 8: 1.0, 12: 1.25, 13: 1.75}
    assert skinny_row_factor(table, [1, 6, 8, 12, 13, 17, 512]).tolist() == [1, 1.5, 1.0, 1.25, 1.75, 1, 1]
    assert skinny_row_factor({}, [6]).tolist() == [1.0]
    model = load_model("smollm2-135m")
    prec = Precision("fp32", "fp32", "fp32")
    cpu = load_hardware("epyc-9654")
    with_table = dataclasses.replace(cpu, efficiency=dataclasses.replace(cpu.efficiency, skinny_rows=table))
    for batch, factor in ((1, 1.0), (6, 1.5), (8, 1.0), (13, 1.75), (32, 1.0)):
        ops = phase_ops(model, batch, 1, 100, prec, phase="decode")
        plain = {t.op.name: t for t in op_timings(ops, cpu, prec)}
        tabled = {t.op.name: t for t in op_timings(ops, with_table, prec)}
        for name, t in tabled.items():
            skinny = t.op.kind == "matmul" and 2 <= batch <= 16
            want = factor if t.op.kind == "matmul" else 1.0
            assert np.asarray(t.memory_s) == pytest.approx(np.asarray(plain[name].memory_s) * want, rel=1e-12)
            # in the skinny group the table is the whole law: compute only at the bare peak, no efficiency
            bare = np.asarray(t.op.flops) / (cpu.peak_flops("fp32"))
            assert np.asarray(t.compute_s) == pytest.approx(bare if skinny else np.asarray(plain[name].compute_s),
                                                            rel=1e-12)
