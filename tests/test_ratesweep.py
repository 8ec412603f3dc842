"""simulate --rates: the same workload at every rate, its knee against the closed form; simulate's bands."""

import json
import os

import numpy as np
import pytest

from perfmodel.cli.app import main
from perfmodel.errors import PerfmodelError
from perfmodel.planning import ratesweep
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.saturation import saturation
from perfmodel.planning.simulate import SchedulerConfig
from perfmodel.planning.workload import LengthDist, poisson_requests
from perfmodel.specs import load_hardware, load_model

DEP = Deployment(load_model("llama-3.1-8b"), load_hardware("h100-sxm"))


def test_parse_rates():
    assert ratesweep.parse_rates("1:20:1").tolist() == list(range(1, 21))
    assert ratesweep.parse_rates("0.5:2:0.5").tolist() == [0.5, 1.0, 1.5, 2.0]
    assert ratesweep.parse_rates("3,1,2").tolist() == [1, 2, 3]
    for bad in ("1:20", "0:5:1", "5:1:1", "1:5:-1", "a,b", "", "1:1e9:1e-3", "nan,1"):
        with pytest.raises(PerfmodelError, match="--rates"):
            ratesweep.parse_rates(bad)


def test_a_row_is_the_draw_at_that_rate():
    inp, out = LengthDist("uniform", 100, 900), LengthDist("fixed", 64)
    unit = poisson_requests(5.0, 300, inp, out, seed=7)
    at = ratesweep.at_rate(unit, 5.0, 13.0)
    direct = poisson_requests(13.0, 300, inp, out, seed=7)
    np.testing.assert_allclose(at.arrival_s, direct.arrival_s, rtol=1e-12)
    assert (at.input_tokens == direct.input_tokens).all()


def test_knee_matches_closed_form_and_latency_rises():
    inp, out, mb = 512, 128, 32  # decode-bound
    sat = saturation(DEP, inp, out, mb)["rate_rps"]
    reqs = poisson_requests(1.0, 600, LengthDist("fixed", inp), LengthDist("fixed", out), seed=3)
    res = ratesweep.sweep(DEP, reqs, 1.0, sat * np.array([0.3, 0.6, 0.9, 1.3, 1.8]), SchedulerConfig(mb),
                          saturation_rps=sat, bands=False)
    rows = res["rows"]
    assert res["knee_rps"] == pytest.approx(sat, rel=0.10)
    assert [r["rho"] for r in rows] == pytest.approx([0.3, 0.6, 0.9, 1.3, 1.8])
    assert rows[-1]["ttft_p90_s"] > 5 * rows[0]["ttft_p90_s"]
    assert rows[0]["served_rps"] == pytest.approx(rows[0]["rate_rps"], rel=0.1)  # below the knee: all served
    below = ratesweep.sweep(DEP, reqs, 1.0, sat * np.array([0.2, 0.4]), SchedulerConfig(mb), bands=False)
    assert below["knee_rps"] is None


def test_cli_sweep_json_csv_plot(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    args = ["simulate", "--model", "llama-3.1-8b", "--requests", "150", "--input", "512", "--output", "32",
            "--max-batch", "16", "--rates", "10,40,160"]
    assert main(args + ["--plot", str(png), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["rate_rps"] for r in d["rows"]] == [10, 40, 160] and d["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, nothing left behind
    umask = os.umask(0)
    os.umask(umask)
    assert png.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    for r in d["rows"]:
        lo, hi = r["tpot_p50_band_s"]
        assert lo <= r["tpot_p50_s"] <= hi and lo < hi
        assert r["rho"] == pytest.approx(r["rate_rps"] / d["saturation"]["rate_rps"])
    assert main(args + ["--format", "csv", "--no-bands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("rate_rps,ttft_p50_s,ttft_p90_s,tpot_p50_s") and len(lines) == 4
    assert main(args + ["--no-bands"]) == 0
    assert "measured knee" in capsys.readouterr().out


@pytest.mark.parametrize("extra,needle", [(["--rates", "1:x:1"], "--rates"), (["--plot", "a.png"], "--plot"),
                                          (["--rates", "1,2", "--plot", "a.txt"], "--plot")])
def test_cli_sweep_bad_input(extra, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--requests", "20", "--no-bands", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_simulate_latencies_carry_bands(capsys):
    assert main(["simulate", "--model", "llama-3.1-8b", "--requests", "200", "--rate", "8", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for m in ("ttft_s", "tpot_s", "e2e_s"):
        for q in ("p50", "p90", "p99"):
            lo, hi = d["band_s"][m][q]
            assert lo < d[m][q] < hi
    assert main(["simulate", "--model", "llama-3.1-8b", "--requests", "100", "--rate", "8"]) == 0
    assert "optimistic–pessimistic" in capsys.readouterr().out
