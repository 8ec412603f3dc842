"""The published-measurements set: its content, the pure-roofline bound, the split by source, the fit, the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from perfmodel.cli.app import main
from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.specs import load_hardware, load_model
from perfmodel.validation import measurements as pm


@pytest.fixture(scope="module")
def builtin():
    return pm.read_published("builtin")


@pytest.fixture(scope="module")
def evaluated(builtin):
    return pm.evaluate_published(builtin)


def test_builtin_set_content(builtin, evaluated):
    assert len(builtin) >= 100
    assert builtin["hardware"].nunique() >= 8
    assert builtin["framework"].nunique() >= 3
    assert builtin["source"].str.startswith("https://").all()
    assert (builtin["source_date_or_commit"].str.len() > 0).all()
    assert list(builtin.columns[1:]) == list(pm.PUBLISHED_COLUMNS)
    # the rows that the library can predict cover the same breadth
    evals, _ = evaluated
    assert len({r.e.hw.name for r in evals}) >= 8 and len({r.framework for r in evals}) >= 3


def test_builtin_is_package_data():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(pm.__file__).parents[2] / "pyproject.toml").read_text())
    assert "*.csv" in cfg["tool"]["setuptools"]["package-data"]["perfmodel.data"]
    assert pm.builtin_measurements_path().is_file()


def test_no_row_beats_the_pure_roofline(builtin):
    beats, checked = pm.roofline_check(builtin)
    assert checked >= 200
    assert beats == [], "rows faster than the datasheet roofline: " + "; ".join(
        f"line {b['row']} {b['hardware']} {b['model']} {b['metric']} measured {b['measured']:.4g} "
        f"bound {b['roofline']:.4g}" for b in beats)


def test_roofline_check_catches_an_impossible_row(builtin):
    """Llama-2-7B decoding 2,000 tokens/s at batch 1 on one H100 would stream 27 TB/s: the check must say so."""
    row = builtin.iloc[[0]].copy()
    row[["model", "hardware", "weight_dtype", "activation_dtype", "kv_dtype", "gpus", "tp"]] = \
        ["llama-2-7b", "h100-sxm", "fp16", "fp16", "fp16", "1", "1"]
    row[["batch_or_concurrency", "input_tokens", "output_tokens", "metric", "value", "unit", "per", "scenario"]] = \
        ["1", "0", "128", "decode_tokens_per_s", "2000", "tokens/s", "request", "llama-bench tg"]
    beats, checked = pm.roofline_check(row)
    assert checked == 1 and len(beats) == 1 and beats[0]["roofline"] < 2000


def test_every_row_predicted_or_listed(builtin, evaluated):
    evals, unexpressed = evaluated
    assert len(evals) + len(unexpressed) == len(builtin)
    assert all(u["reason"] for u in unexpressed)
    reasons = {u["row"]: u["reason"] for u in unexpressed}
    ambiguous = builtin[builtin["metric"] == "tokens_per_s"]["row"]
    assert all("input tokens" in reasons[r] for r in ambiguous)
    row = builtin.iloc[0].copy()
    for field, value, says in [("hardware", "no-such-gpu", "hardware 'no-such-gpu'"),
                               ("model", "no-such-model", "model 'no-such-model'"),
                               ("weight_dtype", "fp3", "weight dtype 'fp3'"), ("pp", "2", "pipeline-parallel"),
                               ("input_tokens", "", "input length"), ("metric", "joules", "metric 'joules'")]:
        r = row.copy()
        r[field] = value
        assert says in pm.express_row(r)


def test_single_device_prediction_is_analyze(builtin, evaluated):
    """On one device the nominal prediction is the cost model's own request-level figure under the framework's
    shipped profile (its exec mode, multipliers and host overhead per step)."""
    evals, _ = evaluated
    checked = 0
    for r in evals:
        e = r.e
        if e.par.tp != 1 or e.decode_only or e.metric not in ("ttft_s", "e2e_s", "output_tokens_per_s"):
            continue
        assert e.profile is not None and e.exec_mode == e.profile.exec_mode
        a = analyze(e.model, e.hw_run, Workload(r.batch, e.input_tokens, max(e.output_tokens, 1)), e.precision,
                    exec_mode=e.exec_mode)
        q = a.request
        want = {"ttft_s": q["ttft_s"], "e2e_s": q["e2e_s"],
                "output_tokens_per_s": r.batch * e.output_tokens / q["e2e_s"] / e.divide}[e.metric]
        assert r.nominal == pytest.approx(want, rel=1e-9)
        checked += 1
    assert checked >= 20


def test_llama_bench_decode_is_steps_from_an_empty_cache():
    hw = load_hardware("rtx-4090")
    row = pd.Series({"row": 2, "source": "https://example.org", "framework": "llama.cpp", "model": "llama-2-7b",
                     "hardware": "rtx-4090", "weight_dtype": "fp16", "activation_dtype": "fp16", "kv_dtype": "fp16",
                     "gpus": "1", "tp": "1", "pp": "1", "ep": "1", "batch_or_concurrency": "1", "input_tokens": "0",
                     "output_tokens": "128", "metric": "decode_tokens_per_s", "value": "50", "unit": "tokens/s",
                     "per": "request", "scenario": "llama-bench tg"})
    e = pm.express_row(row)
    r = pm.evaluate_row(e)
    from perfmodel.frameworks import apply_framework, load_framework

    prof = load_framework("llama.cpp")
    a = analyze(load_model("llama-2-7b"), apply_framework(hw, prof), Workload(1, 1, 129),
                Precision("fp16", "fp16", "fp16"), exec_mode=prof.exec_mode)
    steps = a.decode_step_times() + a.request["host_overhead_per_step_s"]  # past 1..128; tg starts from 0
    assert r.nominal == pytest.approx(128 / steps.sum(), rel=1e-3)


def test_split_never_shares_a_source(builtin, evaluated):
    evals, _ = evaluated
    half = pm.split_by_source(builtin)
    assert set(half) == set(builtin["source"])
    per_source = builtin.assign(h=builtin["source"].map(half)).groupby("source")["h"].nunique()
    assert (per_source == 1).all()
    # deterministic, whatever the row order, and both halves hold rows of every framework with two sources
    shuffled = builtin.sample(frac=1.0, random_state=3)
    assert pm.split_by_source(shuffled) == half
    for fw, g in builtin.groupby("framework"):
        if g["source"].nunique() >= 2:
            assert {half[s] for s in g["source"]} == {0, 1}, fw


def test_fit_recovers_known_numbers(evaluated):
    """Rows whose 'measured' values the model itself produced at known numbers: the fit must find them again."""
    import dataclasses

    evals, _ = evaluated
    rows = [r for r in evals if r.framework == "vllm"]
    truth = {**pm.DEFAULT_PARAMS, "compute_multiplier": 0.8, "memory_multiplier": 0.9, "host_overhead_us": 800.0,
             "collective_latency_us": 20.0}
    fake = [dataclasses.replace(r, framework="synthetic",
                                e=dataclasses.replace(r.e, measured=r.predict(truth))) for r in rows]
    fitted = pm.fit_framework(fake, "synthetic")
    err = [abs(r.predict(fitted) / r.e.measured - 1) for r in fake]
    assert np.median(err) < 0.02
    assert fitted["memory_multiplier"] == pytest.approx(0.9, rel=0.15)
    assert fitted["provenance"]["n"] == len(rows) and fitted["provenance"]["sources"]


def test_holdout_report_improves_held_out_rows(builtin, evaluated):
    evals, _ = evaluated
    rep = pm.holdout_report(evals, builtin)
    assert rep["n_fit"] > 0 and rep["n_heldout"] > 0
    before = {(r["framework"], r["metric"]): r for r in rep["before_heldout"]}
    after = {(r["framework"], r["metric"]): r for r in rep["after_heldout"]}
    assert set(before) == set(after)
    # the fitted numbers help where the framework's kernels differ most from the library's defaults
    for key in [("vllm", "e2e_s"), ("tensorrt-llm", "ttft_s")]:
        assert after[key]["median_abs_pct"] < before[key]["median_abs_pct"]
    # the bar: every framework with at least 10 held-out rows within 15 % median |error| after the fit
    for fw in {k[0] for k in after}:
        r = after.get((fw, pm.ALL_METRICS)) or next(v for k, v in after.items() if k[0] == fw)
        if r["n"] >= 10:
            assert r["median_abs_pct"] <= 15.0, (fw, r)


def test_gguf_mix_bytes_match_the_published_files():
    """Q4_K_M as llama.cpp builds it (Q6_K output, Q6_K attn_v/ffn_down in use_more_bits layers, Q5_K attn_v on
    70B): the weight bytes the rows predict with, against the file sizes the source prints (4.58 and 39.59 GiB)."""
    from perfmodel.costmodel.operators import Precision, phase_ops

    for name, gib in (("llama-3.1-8b", 4.58), ("llama-3.1-70b", 39.59)):
        m = load_model(name)
        f = pm.gguf_mix_factors(m, "q4_k_m")
        ops = phase_ops(m, 1, 1, 0, Precision("q4_k", "fp16", "fp16"), True, phase="decode")
        total = sum(float(o.weight_bytes) * o.layers * f.get(o.name, 1.0) for o in ops
                    if o.kind == "matmul" or o.name == "embed")
        total += m.vocab_size * m.hidden_size * 0.5625 - sum(  # the whole embedding table, not the one row read
            float(o.weight_bytes) for o in ops if o.name == "embed")
        assert total / 2**30 == pytest.approx(gib, rel=0.01), name


def test_rows_contradicting_their_source_are_listed(builtin, evaluated):
    """A 16-bit prefill slower than the same run's block-quantised one is listed with the reason, not predicted."""
    _, unexpressed = evaluated
    listed = {u["row"]: u["reason"] for u in unexpressed if u["reason"].startswith("contradicts its source")}
    assert set(listed) == set(pm.contradicted_rows(builtin))
    for row in listed:  # each names the 16-bit row's weights and the faster quantised row of the same run
        r = builtin[builtin["row"] == row].iloc[0]
        assert r["weight_dtype"] in ("fp16", "bf16") and r["metric"] == "prefill_tokens_per_s"
    pair = builtin[builtin["row"] == 302].copy()  # rtx-4090 fp16 pp512, faster than its Q4_K_M row 298
    assert pm.contradicted_rows(pd.concat([pair, builtin[builtin["row"] == 298]])) == {}
    pair["value"] = "100"
    assert set(pm.contradicted_rows(pd.concat([pair, builtin[builtin["row"] == 298]]))) == {302}


def test_llama_cpp_gemms_run_at_the_fp16_accumulate_peak():
    """llama.cpp's cuBLAS GEMMs accumulate in fp16: GeForce boards run them at twice their fp32-accumulate peak;
    hardware that lists no such rate keeps its fp16 peak; a framework without the flag changes nothing."""
    from perfmodel.frameworks import apply_framework, hardware_family, load_framework

    lcpp, vllm = load_framework("llama.cpp"), load_framework("vllm")
    g = load_hardware("rtx-4090")
    assert apply_framework(g, lcpp).peak_flops("fp16") == pytest.approx(2 * g.peak_flops("fp16"), rel=0.01)
    assert apply_framework(g, vllm).peak_flops("fp16") == g.peak_flops("fp16")
    a100 = load_hardware("a100-80gb")
    assert apply_framework(a100, lcpp).peak_flops("fp16") == a100.peak_flops("fp16")
    assert hardware_family(g) == "geforce" and hardware_family(a100) == "ampere"


def test_cli_builtin_json(capsys):
    assert main(["validate", "--measurements", "builtin", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr()[0])
    assert d["rows"] == d["predicted"] + len(d["not_expressible"])
    assert {r["framework"] for r in d["heldout_after_fit"]} >= {"vllm", "tensorrt-llm"}
    assert all(r["reason"] for r in d["not_expressible"])


def test_cli_fit_writes_profile(tmp_path, capsys):
    code = main(["validate", "--measurements", "builtin", "--fit", "--framework", "vllm", "--out-dir",
                 str(tmp_path)])
    out = capsys.readouterr()[0]
    assert code == 0
    path = tmp_path / "framework-fit-vllm.yaml"
    assert str(path) in out.replace("\n", "")
    d = yaml.safe_load(path.read_text())
    assert d["name"] == "vllm" and d["provenance"]["fit"]["sources"] and d["provenance"]["held_out_error_after_fit"]
    assert set(d["provenance"]["not_in_profile"]) == set(pm.EXTRA_PARAMS)


def test_written_profile_reproduces_the_fit(builtin, evaluated, tmp_path):
    """The profile file carries the fitted numbers the cost model can apply: analyze under it equals the fit's
    own prediction with the numbers a profile has no field for left at their defaults."""
    from perfmodel.frameworks import apply_framework, load_framework

    evals, _ = evaluated
    rows = [r for r in evals if r.framework == "llama.cpp"]
    fitted = pm.fit_framework(rows, "llama.cpp")
    rep = {"before_heldout": [], "after_heldout": []}
    path = pm.write_profile(tmp_path / "fit.yaml", fitted, rep, "builtin")
    prof = load_framework(str(path))
    assert prof.exec_mode == load_framework("llama.cpp").exec_mode
    plain = {**fitted, **{k: pm.DEFAULT_PARAMS[k] for k in pm.EXTRA_PARAMS}}
    checked = 0
    for r in rows:
        e = r.e
        if e.decode_only or e.metric != "prefill_tokens_per_s" or e.mix:
            continue  # analyze has one weight format: a GGUF mix's heavier tensors are the fit's own
        a = analyze(e.model, apply_framework(e.hw, prof), Workload(1, e.input_tokens, 1), e.precision,
                    exec_mode=prof.exec_mode)
        # the profile holds each machine's multipliers as products rounded to 4 decimals
        assert r.predict(plain) == pytest.approx(e.input_tokens / a.request["ttft_s"], rel=1e-3)
        checked += 1
    assert checked >= 5


def test_cli_published_errors(tmp_path, capsys):
    assert main(["validate", "--measurements", "builtin", "--framework", "nope"]) == 2
    assert "--framework" in capsys.readouterr()[1]
    bad = tmp_path / "bad.csv"
    df = pm.read_published("builtin").drop(columns=["row"]).head(3)
    df.loc[1, "unit"] = "furlongs"
    df.to_csv(bad, index=False)
    assert main(["validate", "--measurements", str(bad)]) == 2
    err = capsys.readouterr()[1]
    assert err.count("\n") == 1 and "unit" in err and "line 3" in err
