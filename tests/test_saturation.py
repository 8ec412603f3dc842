"""The closed-form saturation point against the simulator's knee."""

import numpy as np
import pytest

from perfmodel.errors import PerfmodelError
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.saturation import saturation, utilisation
from perfmodel.planning.simulate import SchedulerConfig, simulate
from perfmodel.planning.workload import LengthDist, poisson_requests
from perfmodel.specs import load_hardware, load_model

H100 = load_hardware("h100-sxm")
DEP = Deployment(load_model("llama-3.1-8b"), H100)


def _sim(sat_rate, factor, n, inp, out, max_batch, kv_blocks=0):
    cfg = SchedulerConfig(max_batch, kv_blocks=kv_blocks)
    return simulate(DEP, poisson_requests(factor * sat_rate, n, LengthDist("fixed", inp), LengthDist("fixed", out),
                                          seed=3), cfg)


@pytest.mark.parametrize("inp,out,max_batch,bound", [(512, 128, 32, "decode"), (2048, 32, 64, "prefill")])
def test_closed_form_matches_simulated_knee(inp, out, max_batch, bound):
    s = saturation(DEP, inp, out, max_batch)
    assert s["bound"] == bound
    lam = s["rate_rps"]
    # well past the knee the queue never empties: the throughput is the simulated capacity
    over = _sim(lam, 2.0, 1200, inp, out, max_batch)
    assert over["throughput_requests_per_s"] == pytest.approx(lam, rel=0.10)
    # below the knee latency is bounded: twice the requests, the same TTFT; above it the queue grows with time
    below = [_sim(lam, 0.85, n, inp, out, max_batch)["ttft_s"]["p50"] for n in (500, 1000)]
    above = [_sim(lam, 1.15, n, inp, out, max_batch)["ttft_s"]["p50"] for n in (500, 1000)]
    assert below[1] < 1.5 * below[0] + 0.05
    assert above[1] > 1.6 * above[0]
    assert utilisation(0.85 * lam, s) == pytest.approx(0.85)


def test_kv_bound_when_pool_is_small():
    kv = 2000  # blocks of 16 tokens: 32k tokens, about 40 sequences of 512 + 256
    s = saturation(DEP, 512, 256, 256, kv_blocks=kv)
    assert s["bound"] == "kv" and s["batch"] == s["kv_batch"] < 256
    loose = saturation(DEP, 512, 256, 256)
    assert s["rate_rps"] < loose["rate_rps"]


def test_host_overhead_lowers_capacity():
    import dataclasses

    slow = Deployment(DEP.model, dataclasses.replace(H100, host_overhead_us=5000.0))
    a, b = saturation(DEP, 512, 128, 32), saturation(slow, 512, 128, 32)
    assert b["rate_rps"] < a["rate_rps"]
    # 5 ms per decode step more, shared by the decode batch over its 127 decode tokens
    extra = 127 * 5e-3 / a["decode_batch"]
    assert 1 / b["rate_rps"] - 1 / a["rate_rps"] == pytest.approx(extra, rel=0.15)


def test_distributions_and_replicas():
    rng = np.random.default_rng(0)
    inp = LengthDist("lognormal", 512, 0.6).sample(4000, rng)
    s = saturation(DEP, inp, 128, 64)
    fixed = saturation(DEP, float(np.mean(inp)), 128, 64)
    assert s["rate_rps"] == pytest.approx(fixed["rate_rps"], rel=0.15)
    assert utilisation(10.0, s, replicas=2) == pytest.approx(10.0 / (2 * s["rate_rps"]))


def test_bad_input_is_one_line():
    with pytest.raises(PerfmodelError, match="max_batch"):
        saturation(DEP, 512, 128, 0)
    with pytest.raises(PerfmodelError, match="KV budget"):
        saturation(DEP, 512, 128, 8, kv_blocks=10)


def test_plan_spare_holds_slo_with_one_replica_down():
    from perfmodel.planning.planner import SLO, PlanInput, plan

    m, rate, slo = load_model("llama-3.1-8b"), 30.0, SLO(ttft_s=1.0, tpot_s=0.04)
    work = PlanInput(np.array([1024]), np.array([128]), rate)
    base = plan(m, H100, work, slo, max_tp=2, max_pp=1)["best"]
    n1 = plan(m, H100, work, slo, max_tp=2, max_pp=1, spare=1)["best"]
    assert n1["replicas"] >= 2 and n1["gpus"] > base["gpus"] and n1["spare"] == 1
    up = n1["replicas"] - 1  # one replica down: the rate spread over the rest
    assert rate / up <= n1["saturation_rps_per_replica"] and n1["rho_spare_down"] < 1
    # re-evaluate by simulation: one surviving replica at its share of the load, at the planned batch
    dep = Deployment(m, H100, __import__("perfmodel.costmodel.parallel", fromlist=["Parallelism"]).Parallelism(
        tp=n1["tp"]))
    r = simulate(dep, poisson_requests(rate / up, 600, LengthDist("fixed", 1024), LengthDist("fixed", 128), seed=5),
                 SchedulerConfig(n1["batch"]))
    assert r["ttft_s"]["p90"] <= slo.ttft_s and r["tpot_s"]["p90"] <= slo.tpot_s
    # without the spare, the same load with one replica down would be over capacity
    if base["replicas"] == 1:
        return
    assert rate / (base["replicas"] - 1) > base["saturation_rps_per_replica"] * 0.9


def test_plan_bands_contain_nominal():
    from perfmodel.planning.planner import SLO, PlanInput, plan

    r = plan(load_model("llama-3.1-8b"), H100, PlanInput(np.array([2048]), np.array([256]), 30.0), SLO(2.0, 0.03))
    for o in r["options"]:
        for k in ("ttft", "tpot"):
            lo, hi = o[f"{k}_band_s"]
            assert lo <= o[f"{k}_s"] <= hi and lo < hi


def test_cli_prints_saturation_and_rho(capsys):
    import json

    from perfmodel.cli.app import main

    main(["simulate", "--model", "llama-3.1-8b", "--rate", "10", "--requests", "200", "--max-batch", "32",
          "--input", "512", "--output", "64", "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert out["rho"] == pytest.approx(10 / out["saturation"]["rate_rps"])
    main(["plan", "--model", "llama-3.1-8b", "--rate", "20", "--spare", "1", "--max-tp", "1", "--max-pp", "1",
          "--format", "json"])
    best = json.loads(capsys.readouterr().out)["best"]
    assert best["spare"] == 1 and best["rho_spare_down"] == pytest.approx(
        20 / ((best["replicas"] - 1) * best["saturation_rps_per_replica"]))


def test_prefix_cache_raises_capacity_as_simulated():
    inp, out, mb, pre = 2048, 32, 64, 1536
    s = saturation(DEP, inp, out, mb, shared_prefix=pre)
    plain = saturation(DEP, inp, out, mb)
    assert s["rate_rps"] > 1.5 * plain["rate_rps"] and s["prefix_hit_tokens"] == 1536
    # output lengths spread (fixed ones finish in cohorts that re-admit together, all prompts in one step)
    reqs = poisson_requests(2 * s["rate_rps"], 1000, LengthDist("fixed", inp - pre), LengthDist("uniform", 16, 48),
                            seed=3)
    r = simulate(DEP, reqs.with_shared_prefix(pre), SchedulerConfig(mb, prefix_cache=True))
    assert r["throughput_requests_per_s"] == pytest.approx(s["rate_rps"], rel=0.10)
