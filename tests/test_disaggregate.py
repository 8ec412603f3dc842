"""Prefill/decode disaggregation: KV transfer in closed form, no prefill stalls in the decode pool, minimal P:D."""

import dataclasses
import json

import numpy as np
import pytest

from perfmodel.cli.app import main
from perfmodel.costmodel.parallel import Parallelism
from perfmodel.errors import PerfmodelError
from perfmodel.planning import disaggregate as dg
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.saturation import saturation
from perfmodel.planning.simulate import SchedulerConfig, StepCosts, simulate
from perfmodel.planning.workload import LengthDist, Requests, poisson_requests
from perfmodel.specs import load_hardware, load_model

H100 = load_hardware("h100-sxm")
LLAMA = load_model("llama-3.1-8b")
DEP = Deployment(LLAMA, H100)


def test_kv_transfer_matches_closed_form():
    tokens = 1000
    kv = LLAMA.num_layers * 2 * LLAMA.num_kv_heads * LLAMA.head_dim * 2 * tokens  # bf16 K and V
    link = H100.interconnect
    assert dg.kv_transfer_bytes(DEP, tokens) == kv
    assert dg.kv_transfer_s(DEP, tokens) == pytest.approx(kv / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6)
    tp2 = Deployment(LLAMA, H100, Parallelism(tp=2))  # each device sends its half over its own link
    assert dg.kv_transfer_s(tp2, tokens) == pytest.approx(kv / 2 / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6)
    # one request alone: its second token comes one transfer plus one decode step after the first
    one = Requests(np.array([0.0]), np.array([tokens]), np.array([2]))
    x = dg.run_split(DEP, one, SchedulerConfig(), dg.Split(1, 1))
    costs = StepCosts(DEP)
    assert x["first"][0] == pytest.approx(costs.step([(tokens, 0)]))
    assert x["finish"][0] - x["first"][0] == pytest.approx(float(dg.kv_transfer_s(DEP, tokens)) +
                                                           costs.step([(1, tokens)]))
    with pytest.raises(PerfmodelError, match="--disaggregate.*interconnect"):
        dg.kv_transfer_s(Deployment(LLAMA, dataclasses.replace(H100, interconnect=None)), tokens)


def test_decode_pool_has_no_prefill_stalls():
    inp, out = 4096, 64  # prefill-heavy: long prompts, short answers
    sat = saturation(DEP, inp, out, 256)["rate_rps"]
    reqs = poisson_requests(0.6 * sat, 600, LengthDist("fixed", inp), LengthDist("fixed", out), seed=2)
    colo = simulate(DEP, reqs, SchedulerConfig())
    x = dg.run_split(DEP, reqs, SchedulerConfig(), dg.Split(1, 1))
    ttft, tpot, _ = dg.latencies(x)
    assert np.percentile(tpot, 90) < 0.5 * colo["tpot_s"]["p90"]
    # every request is decoded once, in order of its own events
    assert np.isfinite(x["finish"]).all()
    assert (x["arrival"] < x["first"]).all() and (x["first"] < x["ready"]).all() and (x["ready"] < x["finish"]).all()
    # a decode step is one of B sequences at most: no TPOT above the full pool's decode step plus the transfer
    costs = StepCosts(DEP)
    worst = costs.decode(256, inp + out) + float(dg.kv_transfer_s(DEP, inp)) / (out - 1)
    assert tpot.max() <= worst


def test_split_saturation_bounds_the_simulated_throughput():
    inp, out = 2048, 128
    cap = dg.split_capacity(DEP, inp, out)
    s = dg.split_saturation(cap, dg.Split(1, 2))
    reqs = poisson_requests(2 * s["rate_rps"], 800, LengthDist("fixed", inp), LengthDist("fixed", out), seed=1)
    served = dg.simulate_split(DEP, reqs, split=dg.Split(1, 2))["throughput_requests_per_s"]
    assert served == pytest.approx(s["rate_rps"], rel=0.10)


def _feasible(reqs, split, slo, cap, rate):
    ttft, tpot, _ = dg.latencies(dg.run_split(DEP, reqs, SchedulerConfig(), split))
    return (np.percentile(ttft, 90) <= slo[0] and np.percentile(tpot, 90) <= slo[1]
            and rate < dg.split_saturation(cap, split)["rate_rps"])


def test_plan_split_is_minimal_among_those_meeting_the_slo():
    inp, out = LengthDist("uniform", 1024, 3072), LengthDist("fixed", 96)
    rng = np.random.default_rng(0)
    i, o = inp.sample(500, rng), out.sample(500, rng)
    cap1 = dg.split_capacity(DEP, i, o)
    rate = 2.5 * cap1["prefill_rps_per_instance"]  # needs several prefill instances
    reqs = dg.plan_requests(i, o, rate, n=500)
    slo = (0.1, 0.01)  # tighter than capacity alone asks: more prefill instances for TTFT, more decode for TPOT
    res = dg.plan_split(DEP, reqs, SchedulerConfig(), *slo)
    b = res["best"]
    assert res["feasible"] and b["meets_slo"]
    split = dg.Split(b["prefill"], b["decode"])
    by_capacity = sum(int(res["rate_rps"] / res["capacity"][f"{k}_rps_per_instance"]) + 1 for k in ("prefill", "decode"))
    assert split.instances > by_capacity  # the SLO, not the closed-form capacity, decided
    assert _feasible(reqs, split, slo, res["capacity"], res["rate_rps"])
    # no split with fewer instances is feasible (every P, D >= 1, the ones the search skipped included)
    for total in range(2, split.instances):
        for p in range(1, total):
            assert not _feasible(reqs, dg.Split(p, total - p), slo, res["capacity"], res["rate_rps"]), (p, total - p)


@pytest.mark.parametrize("text", ["0:1", "1", "a:b", "1:2:3", "1:999"])
def test_split_parse_refuses(text):
    with pytest.raises(PerfmodelError, match="--disaggregate"):
        dg.Split.parse(text)


def test_cli_simulate_and_plan_disaggregate(capsys):
    base = ["simulate", "--model", "llama-3.1-8b", "--requests", "200", "--rate", "5", "--input", "4096",
            "--output", "64"]
    assert main(base + ["--disaggregate", "1:2", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["disaggregation"]["prefill"] == 1 and d["disaggregation"]["decode"] == 2
    assert d["rho"] == pytest.approx(5 / d["saturation"]["rate_rps"])
    lo, hi = d["band_s"]["ttft_s"]["p50"]
    assert lo < d["ttft_s"]["p50"] < hi
    assert main(base + ["--disaggregate", "1:2"]) == 0
    assert "KV transfer" in capsys.readouterr().out
    assert main(base + ["--disaggregate", "1:2", "--rates", "2,20", "--no-bands", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 2
    assert main(base + ["--disaggregate", "2-1"]) == 2
    assert "--disaggregate" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--rate", "12", "--input", "4096", "--output", "128",
                 "--max-tp", "1", "--max-pp", "1", "--disaggregate", "--format", "json"]) == 0
    p = json.loads(capsys.readouterr().out)["disaggregation"]
    assert p["feasible"] and p["best"]["gpus"] == p["best"]["prefill"] + p["best"]["decode"]
    lo, hi = p["best"]["ttft_band_s"]
    assert lo <= p["best"]["ttft_p90_s"] <= hi
    assert main(["plan", "--model", "llama-3.1-8b", "--max-tp", "1", "--max-pp", "1", "--disaggregate"]) == 2
    assert "--rate" in capsys.readouterr().err
