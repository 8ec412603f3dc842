import json
import shutil
import subprocess

import numpy as np
import pytest

from perfmodel.cli.app import main
from perfmodel.costmodel.parallel import Parallelism, ring_allreduce_s
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.costmodel.speculative import expected_tokens_per_step, speculative
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.planner import SLO, PlanInput, plan
from perfmodel.planning.simulate import simulate
from perfmodel.planning.workload import LengthDist, poisson_requests
from perfmodel.specs import load_hardware, load_model

H100 = load_hardware("h100-sxm")


def test_ring_allreduce_formula():
    nbytes = 64 * 2**20
    link = H100.interconnect
    for p in (2, 4, 8):
        expected = 2 * (p - 1) / p * nbytes / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6
        assert ring_allreduce_s(nbytes, p, H100) == pytest.approx(expected)
    assert ring_allreduce_s(nbytes, 1, H100) == 0


def test_tensor_parallel_splits_weights_and_adds_allreduce():
    from perfmodel.planning.deploy import evaluate, memory_per_device

    m = load_model("llama-3.1-70b")
    one = Deployment(m, H100, Parallelism(tp=1))
    four = Deployment(m, H100, Parallelism(tp=4))
    assert memory_per_device(four, 1, 1000)["weights_bytes"] == pytest.approx(
        memory_per_device(one, 1, 1000)["weights_bytes"] / 4)
    e1, e4 = evaluate(one, np.array([1]), 512, 64), evaluate(four, np.array([1]), 512, 64)
    assert e4["tpot_s"][0] < e1["tpot_s"][0] / 2  # streams a quarter of the weights per device
    assert e4["comm_share"][0] > 0


@pytest.mark.parametrize("model,rate,tight_tpot", [("llama-3.1-70b", 20.0, 0.015), ("llama-3.1-8b", 50.0, 0.007)])
def test_planner_needs_fewer_gpus_when_slo_loosens(model, rate, tight_tpot):
    m = load_model(model)
    work = PlanInput(np.array([1024]), np.array([256]), rate)
    tight = plan(m, H100, work, SLO(ttft_s=1.0, tpot_s=tight_tpot))
    loose = plan(m, H100, work, SLO(ttft_s=5.0, tpot_s=0.2))
    assert tight["feasible"] and loose["feasible"]
    assert loose["best"]["gpus"] < tight["best"]["gpus"]
    assert loose["best"]["tpot_s"] <= 0.2 and tight["best"]["tpot_s"] <= tight_tpot


def test_planner_says_when_nothing_fits():
    r = plan(load_model("llama-3.1-405b"), load_hardware("l4"), PlanInput(np.array([1024]), np.array([64]), 1.0),
             SLO(1.0, 0.01), max_tp=1, max_pp=1)
    assert not r["feasible"] and "do not fit" in r["reason"]


def test_planner_band_orders_optimistic_pessimistic():
    r = plan(load_model("llama-3.1-8b"), H100, PlanInput(np.array([2048]), np.array([256]), 30.0), SLO(2.0, 0.03))
    assert r["band"]["optimistic"]["gpus"] <= r["best"]["gpus"] <= r["band"]["pessimistic"]["gpus"]


def test_simulator_matches_analytic_steady_state_at_low_load():
    m = load_model("llama-3.1-8b")
    dep = Deployment(m, H100)
    rate, out = 0.05, 128
    reqs = poisson_requests(rate, 400, LengthDist("fixed", 512), LengthDist("fixed", out), seed=1)
    r = simulate(dep, reqs)
    a = analyze(m, H100, Workload(1, 512, out)).request
    assert r["throughput_output_tokens_per_s"] == pytest.approx(rate * out, rel=0.08)  # Poisson sample of 400
    assert r["throughput_output_tokens_per_s"] == pytest.approx(len(reqs) * out / r["duration_s"], rel=1e-9)
    assert r["mean_tpot_s"] == pytest.approx(a["tpot_s"], rel=0.03)
    assert r["ttft_s"]["p50"] == pytest.approx(a["ttft_s"], rel=0.05)


def test_simulator_is_fast_and_reports_percentiles():
    import time

    dep = Deployment(load_model("llama-3.1-8b"), H100)
    reqs = poisson_requests(20.0, 10_000, LengthDist("uniform", 128, 1024), LengthDist("uniform", 32, 256))
    t = time.perf_counter()
    r = simulate(dep, reqs, ttft_slo=0.5, tpot_slo=0.05)
    assert time.perf_counter() - t < 60  # generous: "seconds" on a loaded 2-core CI machine
    assert r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] <= r["ttft_s"]["p99"]
    assert 0 < r["goodput_requests_per_s"] <= r["throughput_requests_per_s"]


def test_simulator_preempts_when_kv_runs_out():
    from perfmodel.planning.simulate import SchedulerConfig

    dep = Deployment(load_model("llama-3.1-70b"), H100, Parallelism(tp=4))
    reqs = poisson_requests(50.0, 300, LengthDist("fixed", 4000), LengthDist("fixed", 1000))
    r = simulate(dep, reqs, SchedulerConfig(max_batch=256))
    assert r["preemptions"] > 0 and r["requests"] == 300


def test_speculative_formula_and_speedup():
    assert expected_tokens_per_step(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)
    assert expected_tokens_per_step(0.0, 4) == 1.0
    r = speculative(load_model("llama-3.1-70b"), load_model("llama-3.1-8b"), H100, 0.8, 4)
    assert 1.5 < r["speedup"] < r["tokens_per_target_step"]
    bad = speculative(load_model("llama-3.1-70b"), load_model("llama-3.1-8b"), H100, 0.1, 8)
    assert bad["speedup"] < 1  # a poor draft slows decoding down


def test_encoder_and_encoder_decoder_costs():
    bert = analyze(load_model("bert-base"), H100, Workload(4, 256, 1))
    assert bert.memory["kv_cache_bytes"] == 0 and bert.request["tpot_s"] == 0
    att = [o for o in bert.prefill if o.op.name == "attention"][0]
    assert att.op.flops == 4 * 12 * 256 * 256 * (4 * 64 + 5)  # bidirectional: every pair
    t5 = load_model("t5-base")
    a = analyze(t5, H100, Workload(2, 300, 50))
    kv_tok = 12 * 2 * 12 * 64 * 2
    assert a.memory["kv_cache_bytes"] == 2 * (50 + 300) * kv_tok
    names = {t.op.name for t in a.prefill}
    assert {"encoder.attention", "cross_k_proj", "cross_attention"} <= names
    assert "cross_k_proj" not in {t.op.name for t in a.decode}


@pytest.mark.parametrize("args", [
    ["plan", "--model", "llama-3.1-8b", "--rate", "5", "--input", "lognormal:800:0.5"],
    ["compare", "--model", "llama-3.1-8b", "--hardware", "h100-sxm,l4"],
    ["simulate", "--model", "llama-3.1-8b", "--requests", "200", "--rate", "4"],
    ["speculative", "--alpha", "0.7", "--gamma", "3"],
])
def test_planning_commands_json(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(args + ["--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    json.loads(out)


@pytest.mark.parametrize("args,needle", [(["plan", "--tpot", "-1"], "--tpot"), (["plan", "--input", "zipf:3"], "--input"),
                                         (["simulate", "--rate", "0"], "--rate"), (["speculative", "--alpha", "2"], "--alpha"),
                                         (["simulate", "--tp", "3"], "tp")])
def test_planning_bad_input(args, needle, capsys):
    assert main(args) == 2
    assert needle in capsys.readouterr()[1]


def test_report_default_and_rendered_in_chromium(tmp_path, capsys):
    code = main(["report", "--out-root", str(tmp_path), "--format", "json"])
    assert code == 0
    d = json.loads(capsys.readouterr()[0])
    html_path = tmp_path / "llama-3.1-8b-h100-sxm" / "report.html"
    assert str(html_path) == d["report"] and len(d["figures"]) == 3
    text = html_path.read_text()
    assert text.count("data:image/png;base64,") == 3 and "Per-operator table" in text and "Binding constraint" in text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-figures="3"' in dom and 'data-loaded="3"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, "--window-size=1280,2400", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000
