"""The serving loop: ragged forward = per-sequence forward, the scheduler's invariants (no block booked twice,
every request finishes once, preempted requests recompute, prefix blocks freed only when unreferenced), the
ragged step cost, the simulator's prefix cache, and a short serve-bench run."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_torch, needs_weights, small
from perfmodel.engine.backend import make_backend
from perfmodel.engine.transformer import KVCache, Transformer
from perfmodel.engine.weights import random_weights
from perfmodel.planning.workload import LengthDist, Requests, poisson_requests
from perfmodel.serving.bench import ServeConfig, make_prompts, metrics, serve
from perfmodel.serving.blocks import BlockPool, block_hashes
from perfmodel.serving.runner import PagedKV
from perfmodel.serving.scheduler import Scheduler, Sequence


def _engine(backend="numpy", flash=False, structure="eager", name="llama-3.1-8b"):
    spec = small(name)
    return Transformer(spec, random_weights(spec, 0), make_backend(backend), flash=flash, structure=structure)


@pytest.mark.parametrize("backend,flash,structure", [("numpy", False, "eager"), ("numpy", False, "fused"),
                                                     pytest.param("torch", True, "eager", marks=needs_torch),
                                                     pytest.param("torch", False, "fused", marks=needs_torch)])
def test_ragged_forward_equals_per_sequence_forward(backend, flash, structure):
    m = _engine(backend, flash, structure)
    be, spec = m.be, m.spec
    rng = np.random.default_rng(1)
    toks = [rng.integers(0, spec.vocab_size, n) for n in (20, 7, 33, 1)]
    pasts = [13, 0, 32, 0]  # a chunk after a cached part, a whole prompt, a decode step, a one-token prompt
    kv = PagedKV(be, spec, 24, 4)
    tables = [[3, 1, 7, 9, 10], [0, 2], [4, 5, 6, 8, 11, 12, 13, 14, 15], [20]]  # scattered blocks
    first = [(0, p, kv.slots(b, p)) for p, b in zip(pasts, tables) if p]
    m.forward_ragged(np.concatenate([t[:p] for t, p in zip(toks, pasts) if p]), first, kv)
    out = be.to_numpy(m.forward_ragged(np.concatenate([t[p:] for t, p in zip(toks, pasts)]),
                                       [(p, len(t) - p, kv.slots(b, len(t))) for t, p, b in zip(toks, pasts, tables)],
                                       kv))
    for j, t in enumerate(toks):
        ref = be.to_numpy(m.forward(t[None], KVCache(be, spec, 1, 64)))[0, -1]
        np.testing.assert_allclose(out[j], ref, atol=2e-5, rtol=1e-5)


def _drive(pool, seqs, arrivals_per_step=2, chunk=0, rng=None, max_batch=8):
    """Run the scheduler with a fake model (next token = a hash of the sequence so far), checking the pool's
    invariants after every step."""
    sched = Scheduler(pool, max_batch, chunk)
    pending = list(seqs)
    finished, recomputed, steps = [], set(), 0
    while len(finished) < len(seqs):
        for _ in range(arrivals_per_step):
            if pending:
                sched.add(pending.pop(0))
        plan = sched.schedule()
        assert plan, "no progress"
        for s in plan:
            if s.seq.preemptions and not s.decode:
                assert s.start + s.new <= len(s.seq.tokens)
                recomputed.add(s.seq.rid)
        toks = [hash(tuple(s.seq.tokens)) % 1000 if s.samples else None for s in plan]
        finished += sched.update(plan, toks, float(steps))
        pool.check(sched.owners())
        steps += 1
        assert steps < 10_000
    return sched, finished, recomputed


def test_scheduler_invariants_with_preemption_and_prefix_cache():
    rng = np.random.default_rng(0)
    shared = list(range(500, 524))  # a 24-token system prompt: 6 full blocks of 4 tokens
    seqs = [Sequence(i, shared + rng.integers(0, 400, int(rng.integers(1, 20))).tolist(), 0, int(rng.integers(1, 12)))
            for i in range(40)]
    for s in seqs:
        s.prompt_len = len(s.tokens)
    pool = BlockPool(20, 4, prefix_cache=True)  # tight: forces preemptions
    sched, finished, recomputed = _drive(pool, seqs, chunk=16)
    assert sorted(s.rid for s in finished) == list(range(40))  # every request finishes, once
    assert all(s.generated == s.out_len and len(s.token_times) == s.out_len for s in seqs)
    assert sched.stats.preemptions > 0 and recomputed  # preempted requests were recomputed
    assert sched.stats.hit_tokens > 0
    assert pool.free == pool.num_blocks  # everything released at the end


def test_recompute_gives_the_same_tokens_as_no_preemption():
    """Fake model whose next token depends on the whole sequence: preemption must not change any output."""
    def make():
        return [Sequence(i, rng2.integers(0, 99, 9 + i % 7).tolist(), 9 + i % 7, 10) for i in range(12)]

    rng2 = np.random.default_rng(5)
    a = make()
    rng2 = np.random.default_rng(5)
    b = make()
    _drive(BlockPool(200, 4), a)
    sched, _, _ = _drive(BlockPool(9, 4), b, chunk=8)
    assert sched.stats.preemptions > 0
    assert [s.tokens for s in a] == [s.tokens for s in b]


def test_prefix_blocks_freed_only_when_unreferenced():
    pool = BlockPool(4, 2, prefix_cache=True)
    toks = [1, 2, 3, 4, 5]
    a = pool.allocate(3)
    hs = block_hashes(toks, 2, 2)
    pool.register(a[0], hs[0])
    pool.register(a[1], hs[1])
    b = pool.lookup(hs)  # a second request finds both full blocks
    assert b == a[:2] and pool.ref[a[0]] == 2
    pool.release(a)
    assert pool.free == 2 and a[0] not in pool.free_queue  # still referenced by b: not free
    pool.check({1: b})
    pool.release(b)
    assert pool.free == 4 and pool.lookup(hs) == a[:2]  # unreferenced: free, yet still cached
    pool.release(a[:2])
    pool.allocate(4)  # the pool reuses them: evicted from the cache
    assert pool.lookup(hs) == [] and pool.evictions == 2
    pool.release([3])
    with pytest.raises(Exception):
        pool.release([3])  # a block released with no reference left


def test_serve_loop_outputs_match_generation_and_survive_preemption():
    """The real loop on a tiny random model: greedy outputs equal a plain cached generation per request, with a
    pool small enough to preempt."""
    m = _engine()
    spec, be = m.spec, m.be
    # all queued at once (no timing dependence): two 20-token prompts fill the 6 blocks of 8, so growing to
    # 25 tokens preempts
    reqs = Requests(np.zeros(6), np.array([20, 20, 9, 30, 14, 20]), np.full(6, 6))
    corpus = np.random.default_rng(0).integers(0, spec.vocab_size, 2000)
    prompts = make_prompts(corpus, reqs)
    rec = serve(m, reqs, prompts, ServeConfig(kv_blocks=6, block_tokens=8, chunked_prefill=16), warmup=False,
                check_invariants=True)
    assert rec["stats"]["preemptions"] > 0
    for p, r in zip(prompts, rec["requests"]):
        cache = KVCache(be, spec, 1, 64)
        logits = m.forward(np.asarray(p)[None], cache)
        out = []
        for _ in range(r["output_tokens"]):
            t = int(np.argmax(be.to_numpy(logits)[0, -1]))
            out.append(t)
            logits = m.forward(np.asarray([[t]]), cache)
        assert r["output_ids"] == out
    got = metrics(rec)
    assert got["requests"] == 6 and got["ttft_s"]["p50"] > 0 and got["host_overhead_per_step_s"] > 0


def test_ragged_cost_counts_equal_batched_phases():
    from perfmodel.costmodel.operators import Precision, phase_ops
    from perfmodel.costmodel.ragged import ragged_ops
    from perfmodel.specs import load_model

    m = load_model("smollm2-135m")
    p = Precision("fp32", "fp32", "fp32")
    tot = lambda ops, f: sum(float(np.sum(getattr(o, f))) * o.layers for o in ops)  # noqa: E731
    for seqs, ref in (([(1, 300)] * 5, phase_ops(m, 5, 1, 300, p, True)),
                      ([(128, 0)], phase_ops(m, 1, 128, 0, p, True))):
        got = ragged_ops(m, seqs, p, True)
        for f in ("flops", "bytes"):
            assert tot(got, f) == pytest.approx(tot(ref, f), rel=1e-12)
    # a mixed step reads the weights once: less than a prefill and a decode step run apart
    mixed = ragged_ops(m, [(64, 0), (1, 100), (1, 200)], p, True)
    apart = phase_ops(m, 1, 64, 0, p, True) + phase_ops(m, 1, 1, 100, p, True) + phase_ops(m, 1, 1, 200, p, True)
    assert tot(mixed, "flops") == pytest.approx(tot(apart, "flops"), rel=0.02)
    assert tot(mixed, "weight_bytes") < 0.5 * tot(apart, "weight_bytes")


def test_simulated_prefix_cache_hits_the_shared_prefix():
    from perfmodel.costmodel.operators import Precision
    from perfmodel.planning.deploy import Deployment
    from perfmodel.planning.simulate import SchedulerConfig, simulate
    from perfmodel.specs import load_hardware, load_model

    dep = Deployment(load_model("smollm2-135m"), load_hardware("cpu-template"), precision=Precision("fp32", "fp32", "fp32"),
                     exec_mode="eager")
    base = poisson_requests(2.0, 60, LengthDist("fixed", 64), LengthDist("fixed", 8), seed=1)
    reqs = base.with_shared_prefix(128)
    off = simulate(dep, reqs, SchedulerConfig(kv_blocks=400))
    on = simulate(dep, reqs, SchedulerConfig(kv_blocks=400, prefix_cache=True))
    assert off["prefix_hit_rate"] == 0
    assert on["prefix_hit_rate"] == pytest.approx(128 / 192 * 59 / 60, rel=0.05)  # all but the first request hit
    assert on["ttft_s"]["p50"] < off["ttft_s"]["p50"]
    with pytest.raises(Exception):
        Requests(np.zeros(2), np.array([4, 4]), np.array([1, 1]), np.array([5, 0])).check()


@needs_torch
@needs_weights
def test_serve_bench_command_short_run(tmp_path):
    from perfmodel.cli.app import main

    out = tmp_path / "r.json"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["serve-bench", "--layers", "2", "--requests", "5", "--rate", "20", "--input", "uniform:20:40",
                   "--output", "4", "--kv-blocks", "32", "--prefix-cache", "--shared-prefix", "32",
                   "--hardware", "cpu-template", "--records", str(out), "--format", "json", "--no-speed-reference"])
    assert rc == 0
    r = json.loads(buf.getvalue())
    assert set(r) >= {"measured", "simulated", "error_pct"}
    assert {"ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "throughput", "prefix_hit_rate"} <= set(r["error_pct"])
    assert r["measured"]["requests"] == 5 and r["measured"]["prefix_hit_rate"] > 0
    assert json.loads(out.read_text())["steps"]
    # replay: the same records simulated again without serving
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["serve-bench", "--replay", str(out), "--hardware", "cpu-template", "--format", "json"]) == 0
    assert json.loads(buf.getvalue())["measured"] == r["measured"]
    # the reference step timed around the run, 1.5x calibrate's: simulated 1.5x slower, the calibrated kept
    import yaml

    from perfmodel.specs import load_hardware

    hw_file = tmp_path / "drifted.yaml"
    d = yaml.safe_load(Path(load_hardware("cpu-template").path).read_text())
    d["provenance"] = {"reference_step_ms": {"torch": 100.0}}
    hw_file.write_text(yaml.safe_dump(d))
    rec = json.loads(out.read_text())
    rec["reference_step_s"] = [0.14, 0.16]
    out.write_text(json.dumps(rec))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["serve-bench", "--replay", str(out), "--hardware", str(hw_file), "--format", "json"]) == 0
    r2 = json.loads(buf.getvalue())
    assert r2["speed_factor"] == pytest.approx(1.5)
    assert r2["simulated"]["tpot_s"]["p50"] > 1.2 * r2["simulated_calibrated"]["tpot_s"]["p50"]


def _smol_dep(hw_name="cpu-template"):
    from perfmodel.costmodel.operators import Precision
    from perfmodel.planning.deploy import Deployment
    from perfmodel.specs import load_hardware, load_model

    return Deployment(load_model("smollm2-135m"), load_hardware(hw_name), precision=Precision("fp32", "fp32", "fp32"),
                      exec_mode="eager")


def test_fit_recovers_known_matmul_terms():
    import dataclasses

    from perfmodel.serving.fit import _Steps, fit_terms, with_terms

    dep = _smol_dep()
    dep = dataclasses.replace(dep, hardware=dataclasses.replace(
        dep.hardware, efficiency=dataclasses.replace(dep.hardware.efficiency, matmul_half_dim=16.0)))
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(40):
        seqs = [(1, int(rng.integers(50, 400))) for _ in range(int(rng.integers(0, 12)))]
        if rng.random() < 0.6 or not seqs:
            seqs.insert(0, (int(rng.integers(8, 256)), 0))
        steps.append({"sequences": seqs, "forward_s": 0.0})
    truth = {"matmul_compute": 0.5, "matmul_memory": 2.0, "matmul_half_dim": 1.0}
    measured = _Steps(dep, steps).predict(with_terms(dep.hardware, truth))
    for s, t in zip(steps, measured):
        s["forward_s"] = float(t)
    _, rep = fit_terms(dep, steps)
    assert rep["median_abs_error_pct_after"] < 1.0 < rep["median_abs_error_pct_before"]
    # on this template the matmuls are compute-bound at every step size: the compute terms are what the
    # steps determine (the memory multiplier is free to go anywhere that keeps them compute-bound)
    assert rep["terms"]["matmul_compute"] == pytest.approx(0.5, rel=0.02)
    assert rep["terms"]["matmul_half_dim"] == pytest.approx(1.0, rel=0.05)


def test_closed_form_saturation_near_the_simulated_overload_throughput():
    from perfmodel.planning.simulate import SchedulerConfig, StepCosts, simulate
    from perfmodel.serving.capacity import saturation_rate

    dep = _smol_dep()
    reqs = Requests(np.zeros(200), np.full(200, 160), np.full(200, 24))  # all queued at once: overload
    sim = simulate(dep, reqs, SchedulerConfig(64, 16, 256, 256))
    cap = saturation_rate(StepCosts(dep), reqs.input_tokens, reqs.output_tokens, 64, 256)
    assert cap["rate_rps"] == pytest.approx(sim["throughput_requests_per_s"], rel=0.15)


def test_serve_bench_refuses_a_file_that_is_not_records(tmp_path, capsys):
    from perfmodel.cli.app import main

    bad = tmp_path / "x.json"
    bad.write_text('{"steps": []}')
    assert main(["serve-bench", "--replay", str(bad), "--hardware", "cpu-template"]) == 2
    assert "not a serve-bench records file" in capsys.readouterr().err


def test_ragged_sequence_cost_replaces_attention_dispatch_per_sequence_and_layer():
    import dataclasses

    from perfmodel.costmodel.ragged import ragged_step_seconds

    dep = _smol_dep()
    m, hw, p = dep.model, dep.hardware, dep.precision
    with_us = lambda us: dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, ragged_sequence_us=us))  # noqa: E731
    seqs = [(1, 200)] * 7 + [(48, 0)]
    zero, ten = ragged_step_seconds(m, with_us(0.0), seqs, p), ragged_step_seconds(m, with_us(10.0), seqs, p)
    assert ten - zero == pytest.approx(10e-6 * len(seqs) * m.num_layers, rel=1e-9)
    # without the term, each attention operator pays its own (batched-op) dispatch: never cheaper than zero
    assert ragged_step_seconds(m, hw, seqs, p) > zero
    # graph modes launch one kernel over all sequences: the eager per-sequence term does not apply
    assert ragged_step_seconds(m, with_us(10.0), seqs, p, exec_mode="graph") == pytest.approx(
        ragged_step_seconds(m, with_us(0.0), seqs, p, exec_mode="graph"))


def test_slowed_hardware_scales_every_step_time():
    from perfmodel.costmodel.ragged import ragged_step_seconds

    dep = _smol_dep()
    m, hw, p = dep.model, dep.hardware, dep.precision
    seqs = [(1, 300)] * 5 + [(64, 0)]
    for mode in ("eager", "graph"):
        assert ragged_step_seconds(m, hw.slowed(1.7), seqs, p, exec_mode=mode) == pytest.approx(
            1.7 * ragged_step_seconds(m, hw, seqs, p, exec_mode=mode), rel=1e-9)
    with pytest.raises(Exception, match="speed factor"):
        hw.slowed(0.0)
    with pytest.raises(Exception, match="compute speed factor"):
        hw.slowed(1.0, -1.0)


def test_two_speeds_slow_their_own_roofs():
    """compute_factor slows the FLOP roofs alone: a compute-bound prefill follows it, a memory-bound decode
    step follows the streaming factor; the mixed speed of a point weighs the two in the log."""
    import math

    from perfmodel.costmodel.operators import phase_ops
    from perfmodel.costmodel.roofline import op_timings
    from perfmodel.validation.reference import mixed_speed

    dep = _smol_dep()
    m, hw, p = dep.model, dep.hardware, dep.precision
    slow = hw.slowed(1.0, 2.0)
    for t0, t1 in zip(op_timings(phase_ops(m, 1, 512, 0, p, phase="prefill"), hw, p),
                      op_timings(phase_ops(m, 1, 512, 0, p, phase="prefill"), slow, p)):
        assert np.asarray(t1.compute_s) == pytest.approx(2 * np.asarray(t0.compute_s), rel=1e-12)
        assert np.asarray(t1.memory_s) == pytest.approx(np.asarray(t0.memory_s), rel=1e-12)
    assert mixed_speed(1.3, None, 0.9) == 1.3  # a file without the compute reference: streaming alone
    assert mixed_speed(1.0, 2.0, 1.0) == pytest.approx(2.0)
    assert mixed_speed(1.0, 2.0, 0.5) == pytest.approx(math.sqrt(2.0))
    assert mixed_speed(1.5, 2.0, -0.2) == pytest.approx(1.5)  # shares are clipped to [0, 1]


def test_ragged_sequence_fit_recovers_a_known_cost():
    import dataclasses

    from perfmodel.costmodel.ragged import ragged_step_seconds
    from perfmodel.validation.ragged_calibration import _compositions, fit_sequence_cost

    dep = _smol_dep()
    m, p = dep.model, dep.precision
    truth = dataclasses.replace(dep.hardware, efficiency=dataclasses.replace(dep.hardware.efficiency,
                                                                            ragged_sequence_us=27.0))
    # measured = the model with a known per-sequence cost, plus a body error that is the same at every split
    measured = {k: ragged_step_seconds(m, truth, c, p) + 0.004 for k, c in _compositions().items()}
    assert fit_sequence_cost(m, dep.hardware, measured, p, flash=True) == pytest.approx(27.0, rel=1e-6)


def test_ragged_sequence_cost_measured_on_a_small_engine():
    from perfmodel.validation.ragged_calibration import measure_splits

    spec = small("smollm2-135m", max_position=256)
    engine = Transformer(spec, random_weights(spec, seed=0), make_backend("numpy"))
    times = measure_splits(engine, repeats=2)
    assert sorted(times) == [1, 4, 16, 32] and all(t > 0 for t in times.values())
