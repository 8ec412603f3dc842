import json
import subprocess
import sys

import pytest

from perfmodel.cli.app import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_default_table(capsys):
    code, out, _ = run(["analyze"], capsys)
    assert code == 0
    assert "llama-3.1-8b on h100-sxm" in out and "TTFT" in out and "decode" in out


def test_analyze_json_schema(capsys):
    code, out, _ = run(["analyze", "--model", "smollm2-135m", "--batch", "2", "--format", "json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert {"model", "hardware", "prefill", "decode", "request", "memory", "ops"} <= set(d)
    for ph in ("prefill", "decode"):
        assert {"flops", "bytes", "time_s", "bound"} <= set(d[ph])
    assert {"weights_bytes", "kv_cache_bytes", "kv_bytes_per_token", "activation_bytes", "fits"} <= set(d["memory"])
    assert {"ttft_s", "tpot_s", "e2e_s", "tokens_per_s"} <= set(d["request"])
    assert d["memory"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 2
    assert sum(r["flops"] for r in d["ops"] if r["phase"] == "prefill") == d["prefill"]["flops"]


def test_analyze_csv(capsys):
    code, out, _ = run(["analyze", "--format", "csv", "--no-flash"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("phase,op,kind")
    assert any(",softmax," in line for line in lines)


@pytest.mark.parametrize("args,needle", [
    (["analyze", "--model", "gpt-17"], "model"),
    (["analyze", "--batch", "-1"], "batch"),
    (["analyze", "--dtype", "fp12"], "dtype"),
    (["analyze", "--hardware", "tpu-v9"], "hardware"),
    (["analyze", "--format", "xml"], "--format"),
    (["analyze", "--batch", "abc"], "batch"),
    (["sweep", "--batch", "0,4"], "--batch"),
])
def test_bad_input_one_line_exit_2(args, needle, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err


def test_malformed_yaml_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmemory: {capacity_gb: [1\n")
    code, _, err = run(["analyze", "--hardware", str(p)], capsys)
    assert code == 2 and "malformed YAML" in err and len(err.strip().splitlines()) == 1


def test_models_and_hardware_json(capsys):
    code, out, _ = run(["models", "--format", "json"], capsys)
    names = {r["name"] for r in json.loads(out)}
    assert {"llama-2-7b", "mixtral-8x7b", "deepseek-v3", "gpt2", "smollm2-135m"} <= names
    code, out, _ = run(["hardware", "--format", "csv"], capsys)
    assert "h100-sxm" in out and code == 0


def test_sweep_writes_csv(tmp_path, capsys):
    out_file = tmp_path / "grid.csv"
    code, out, _ = run(["sweep", "--model", "llama-3.1-8b,mixtral-8x7b", "--hardware", "h100-sxm,a100-80gb",
                        "--batch", "1:4", "--input", "128,512", "--output", "64", "--out", str(out_file),
                        "--format", "json"], capsys)
    assert code == 0
    import pandas as pd
    df = pd.read_csv(out_file)
    assert len(df) == 2 * 2 * 4 * 2 * 1 == len(json.loads(out))
    assert not list(tmp_path.glob(".*tmp"))


def test_console_script_fast_import_and_subprocess():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "perfmodel", "models", "--format", "json"],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert "torch" not in r.stderr.split() and " matplotlib" not in r.stderr
