"""Seeded fuzz of every command with bad input, run in-process against the CLI's error boundary.

Each case is argv plus the files it names (mutated hardware/model/framework YAML, config.json, trace and
measurement CSVs, JSON). The contract checked for every one: exit 2 with exactly one line on stderr, or exit 0
with finite, non-negative figures; never a traceback, a warning, a hang (each case runs under a time limit)
or a half-written file. The cases are generated from fixed seeds, so a failure names a case that reproduces.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import re
import signal
import warnings
from pathlib import Path

import pytest
import yaml

from perfmodel.cli.app import main

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[1]
CASE_LIMIT_S = 30  # a case over this is a hang
N_PER_GENERATOR = 60  # cases per generator below (x ~20 generators: > 1,000 bad inputs)

BAD_INT = ["-1", "0", "-0", "nan", "inf", "-inf", "1e400", "9223372036854775808", "-9223372036854775809",
           "abc", "", " ", "1.5", "0x10", "1e3", "+-1", "99999999999999999999999999", "16777217", "2147483648",
           "--", "1 2", "١٢"]
BAD_FLOAT = ["nan", "NaN", "inf", "-inf", "-1", "0", "1e400", "-1e-300", "1e308", "abc", "", " ", "1,5",
             "infinity", "+nan", "-0", "1e-320", "0x1p3", "--", "1e9999"]
JUNK = ["", " ", "x" * 5000, "../../../etc/passwd", "/", "/dev/null", "/proc/self/mem", "nonexistent", ",",
        "a\nb", "é", "\U0001F600", "\x00", "-", "h100-sxm ", "H100-SXM", "a" * 256, "llama-3.1-8b,,", "{}", "[]",
        "*", "~", "$HOME", "'; rm -rf /", "%s%n", "a" * 300 + "/b", "con"]
GOOD = {"batch": ["1", "4", "64"], "input": ["1", "128", "2048"], "output": ["1", "2", "128"],
        "rate": ["0.5", "5", "50"], "ttft": ["0.5", "2"], "tpot": ["0.02", "0.05"]}
LIGHT_FORMATS = ["json", "json", "json", "csv", "table"]


def _pick(rng: random.Random, pool):
    return pool[rng.randrange(len(pool))]


# --- files ---------------------------------------------------------------------------------------------

def _leaves(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(d, list) and d:
        for i, v in enumerate(d):
            yield from _leaves(v, prefix + (i,))
    else:
        yield prefix


BAD_VALUES = [float("nan"), float("inf"), float("-inf"), -1, 0, -1e-9, "x", [], {}, None, True, 10**30, -10**30,
              "1e3", 1e-300, 2**63, "", [1, 2], {"a": 1}]


def _mutate(doc, rng: random.Random):
    """One to three bad edits of a YAML/JSON document: a leaf set to a bad value, a key dropped, junk added."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _leaves(doc) if p]
        if not paths:
            break
        path = _pick(rng, paths)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.75:
            parent[path[-1]] = copy.deepcopy(_pick(rng, BAD_VALUES))
        elif op < 0.9 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[_pick(rng, ["unknown_field", "", "x" * 300])] = _pick(rng, BAD_VALUES)
    return doc


def _dump_yaml(doc, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.06:
        return _pick(rng, ["", "42\n", "- a\n- b\n", "name: [unclosed\n", "\t\x00\x01", "a: b: c\n", "? x\n",
                           "&a [*a]\n", "!!python/object:os.system {}\n"])
    return yaml.safe_dump(doc, allow_unicode=True)


def _hardware_doc():
    return yaml.safe_load((ROOT / "hardware" / "h100-sxm.yaml").read_text())


def _framework_doc():
    return yaml.safe_load((ROOT / "perfmodel" / "frameworks" / "vllm.yaml").read_text())


MODEL_DOC = {"name": "fuzz-model", "family": "llama", "hidden_size": 576, "num_layers": 4, "num_heads": 9,
             "num_kv_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "max_position": 8192,
             "tied_embeddings": True, "rope_theta": 100000.0, "norm_eps": 1e-5}
HF_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 4, "num_attention_heads": 9,
             "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
             "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0,
             "rms_norm_eps": 1e-5, "hidden_act": "silu"}
TRACE_COLS = ["arrival_s", "input_tokens", "output_tokens"]
MEAS_COLS = ["model", "hardware", "batch", "input", "output", "tpot_s"]
BAD_CELLS = ["nan", "-1", "abc", "", "1e30", "inf", "0", "-inf", "1e400", "9223372036854775808", "1.5e", " ",
             '"', "0x10", "NULL", "-0"]


def _csv(cols, rows, rng: random.Random) -> str:
    rows = [list(r) for r in rows]
    r = rng.random()
    if r < 0.06:
        return _pick(rng, ["", "\n", ",".join(cols) + "\n", "\x00\x01\x02" * 50, "a,b\n1\n1,2,3,4\n", '"\n'])
    for _ in range(rng.randint(1, 2)):
        op = rng.random()
        if op < 0.7:
            rows[rng.randrange(len(rows))][rng.randrange(len(cols))] = _pick(rng, BAD_CELLS)
        elif op < 0.85:
            k = rng.randrange(len(cols))
            cols = cols[:k] + cols[k + 1:]
            rows = [row[:k] + row[k + 1:] for row in rows]
        else:
            rows.append([_pick(rng, BAD_CELLS) for _ in cols])
    return "\n".join([",".join(cols)] + [",".join(map(str, row)) for row in rows]) + "\n"


def _trace(rng):
    rows = [[round(0.1 * i, 2), 100 + 7 * i, 10 + i] for i in range(6)]
    return _csv(list(TRACE_COLS), rows, rng)


def _measurements(rng):
    rows = [["llama-3.1-8b", "h100-sxm", b, 512, 128, 0.006 + 0.001 * b] for b in (1, 2, 4)]
    return _csv(list(MEAS_COLS), rows, rng)


def _dist(rng: random.Random) -> str:
    kind = _pick(rng, ["uniform", "normal", "lognormal", "weird", "", "Uniform", "fixed"])
    params = [_pick(rng, BAD_FLOAT + BAD_INT + ["10", "100", "1"]) for _ in range(rng.randint(0, 3))]
    if kind == "" and params:
        return params[0]
    return ":".join([kind, *params])


# --- cases ---------------------------------------------------------------------------------------------

def _fmt(rng):
    return ["--format", _pick(rng, LIGHT_FORMATS)]


def _num_case(rng, cmd, ints, floats=(), base=()):
    """One option of cmd set to a bad number, the others left at their defaults or set to good values."""
    opts = list(ints) + list(floats)
    opt = _pick(rng, opts)
    argv = [cmd, *base]
    for o in opts:
        if o != opt and rng.random() < 0.3 and o.lstrip("-") in GOOD:
            argv += [o, _pick(rng, GOOD[o.lstrip("-")])]
    argv += [opt, _pick(rng, BAD_INT if opt in ints else BAD_FLOAT)]
    return argv + _fmt(rng), {}


def _analyze_num(rng):
    return _num_case(rng, "analyze", ["--batch", "--input", "--output", "--tp", "--pp", "--ep"])


def _analyze_names(rng):
    opt = _pick(rng, ["--model", "--hardware", "--dtype", "--weight-dtype", "--kv-dtype", "--efficiency",
                      "--kv-prune", "--exec", "--framework", "--format"])
    val = _pick(rng, JUNK + ["per-token:nan", "per-token:-1", "kivi:3", "h2o:1", "streaming:1e400",
                             "per-channel:0.5:weird", "dense:1", "fp7", "int3", "q4_k_m"])
    return ["analyze", opt, val] + (_fmt(rng) if opt != "--format" else []), {}


def _analyze_hw_file(rng):
    doc = _mutate(_hardware_doc(), rng)
    cmd = _pick(rng, [["analyze"], ["analyze", "--tp", "2"], ["compare", "--hardware"], ["plan"],
                      ["simulate", "--requests", "50"], ["sweep", "--batch", "1,8"], ["speculative"]])
    argv = list(cmd)
    if argv[-1] != "--hardware":
        argv.append("--hardware")
    return argv + ["{tmp}/hw.yaml"] + _fmt(rng), {"hw.yaml": _dump_yaml(doc, rng)}


def _model_file(rng):
    if rng.random() < 0.5:
        name, text = "model.yaml", _dump_yaml(_mutate(MODEL_DOC, rng), rng)
    else:
        doc = _mutate(HF_CONFIG, rng)
        name = "config.json"
        r = rng.random()
        text = (json.dumps(doc) if r < 0.85 else _pick(rng, ["[1,2]", "{", "", "null", "\"x\"", "{\"a\": NaN}",
                                                             "[" * 100000]))
    cmd = _pick(rng, [["analyze"], ["sweep", "--batch", "1,8"], ["plan"], ["simulate", "--requests", "50"],
                      ["compare", "--hardware", "h100-sxm"]])
    return cmd + ["--model", "{tmp}/" + name] + _fmt(rng), {name: text}


def _framework_file(rng):
    doc = _mutate(_framework_doc(), rng)
    cmd = _pick(rng, [["analyze"], ["sweep", "--batch", "1,2"], ["plan"], ["compare", "--hardware", "h100-sxm"]])
    return cmd + ["--framework", "{tmp}/fw.yaml"] + _fmt(rng), {"fw.yaml": _dump_yaml(doc, rng)}


def _sweep_axes(rng):
    opt = _pick(rng, ["--batch", "--input", "--output", "--tp"])
    val = _pick(rng, ["1:0", "a:b", "1:2:3:4", ",,,", "1e3", "-5:5", "1:10:0", "1:10:-1", "0", "-1", "nan",
                      "1:99999999999", "9223372036854775808", "1,,2", ":", "1:", ":5", "1.5", "1:16777217",
                      "1:100000000", " ", "", "1;2", "0x1:0x2"])
    return ["sweep", opt, val] + _fmt(rng), {}


def _sweep_names(rng):
    opt = _pick(rng, ["--model", "--hardware", "--dtype", "--exec", "--framework"])
    return ["sweep", opt, _pick(rng, JUNK)] + _fmt(rng), {}


def _sweep_out(rng):
    out = _pick(rng, ["{tmp}/d.csv", "{tmp}/f/x.csv", "/proc/x.csv", "{tmp}/x.txt", "{tmp}/" + "x" * 300 + ".csv",
                      "{tmp}/.", "", "{tmp}/x.CSV", "/dev/null", "{tmp}/x.csv/", "/", "{tmp}/x\x00.csv"])
    return ["sweep", "--batch", "1,2", "--out", out] + _fmt(rng), {"f": "a file", "d.csv/": None}


def _plan_num(rng):
    return _num_case(rng, "plan", ["--max-tp", "--max-pp", "--spare"], ["--rate", "--ttft", "--tpot",
                                                                          "--percentile"])


def _plan_dist(rng):
    opt = _pick(rng, ["--input", "--output"])
    return ["plan", opt, _dist(rng), "--rate", "5"] + _fmt(rng), {}


def _plan_trace(rng):
    return ["plan", "--trace", "{tmp}/t.csv", "--rate", "2"] + _fmt(rng), {"t.csv": _trace(rng)}


def _simulate_num(rng):
    return _num_case(rng, "simulate", ["--requests", "--tp", "--pp", "--max-batch", "--block-tokens",
                                       "--chunked-prefill", "--kv-blocks", "--shared-prefix", "--seed"],
                     ["--rate", "--ttft", "--tpot"], base=("--requests", "100"))


def _simulate_dist(rng):
    opt = _pick(rng, ["--input", "--output"])
    return ["simulate", "--requests", "100", opt, _dist(rng)] + _fmt(rng), {}


def _simulate_trace(rng):
    extra = _pick(rng, [[], ["--chunked-prefill", "16"], ["--prefix-cache", "--shared-prefix", "64"],
                        ["--max-batch", "1"], ["--kv-blocks", "40"]])
    return ["simulate", "--trace", "{tmp}/t.csv", *extra] + _fmt(rng), {"t.csv": _trace(rng)}


def _speculative(rng):
    opt = _pick(rng, ["--alpha", "--gamma", "--context", "--batch", "--model", "--draft"])
    pool = {"--alpha": BAD_FLOAT + ["1.5", "0.5,nan", "-0.1", ",", "1:2"], "--gamma": BAD_INT + ["1:0", "0,1"],
            "--model": JUNK, "--draft": JUNK}.get(opt, BAD_INT)
    return ["speculative", opt, _pick(rng, pool)] + _fmt(rng), {}


def _compare(rng):
    if rng.random() < 0.5:
        argv, files = _num_case(rng, "compare", ["--input", "--output", "--batch"])
        return argv, files
    opt = _pick(rng, ["--hardware", "--model", "--out-dir", "--dtype"])
    val = _pick(rng, JUNK + ["{tmp}/f", "h100-sxm,,", "h100-sxm,nope"])
    return ["compare", opt, val] + _fmt(rng), {"f": "a file"}


def _report(rng):
    if rng.random() < 0.6:
        return _num_case(rng, "report", ["--batch", "--input", "--output"], ["--rate", "--ttft", "--tpot"],
                         base=("--out-root", "{tmp}/rep"))
    opt = _pick(rng, ["--out-root", "--name", "--hardware", "--model"])
    val = _pick(rng, JUNK + ["{tmp}/f", "../../x"])
    return ["report", opt, val, "--out-root", "{tmp}/rep"][: 3 if opt == "--out-root" else 5] + _fmt(rng), \
        {"f": "a file"}


def _validate(rng):
    r = rng.random()
    if r < 0.55:
        return ["validate", "--measurements", "{tmp}/m.csv", "--format", "json"], {"m.csv": _measurements(rng)}
    if r < 0.7:
        text = _pick(rng, ["{", "[]", "{\"a\": NaN}", "", "null", "[" * 5000, "{\"results\": [1]}", "\x00"])
        return ["validate", "--measurements", "{tmp}/m.json"], {"m.json": text}
    opt = _pick(rng, ["--repeats", "--grid", "--backend", "--hardware", "--measurements", "--out-dir"])
    pool = {"--repeats": BAD_INT, "--grid": JUNK, "--backend": JUNK + ["cuda"], "--hardware": JUNK,
            "--measurements": JUNK + ["{tmp}/f/"], "--out-dir": ["{tmp}/f", "/proc/x"]}[opt]
    val = _pick(rng, pool)
    if opt in ("--backend", "--out-dir", "--grid") and val in ("", " ", "numpy"):
        val = "weird"  # a valid value here would start a real engine run
    return ["validate", opt, val, "--repeats", "0"], {"f": "a file"}


def _heavy_num(rng):
    """generate, kv-quality, calibrate, serve-bench: always with one bad number (a valid case would run the
    real engine for minutes)."""
    cmd, ints, floats = _pick(rng, [
        ("generate", ["--max-new-tokens", "--top-k", "--seed", "--layers"], ["--temperature", "--top-p"]),
        ("kv-quality", ["--context", "--steps", "--segments", "--window"], []),
        ("serve-bench", ["--threads", "--requests", "--kv-blocks", "--block-tokens", "--chunked-prefill",
                         "--max-batch", "--shared-prefix", "--seed", "--layers"], ["--rate", "--ttft", "--tpot"])])
    opt = _pick(rng, ints + floats)
    bad = [v for v in (BAD_INT if opt in ints else BAD_FLOAT) if v not in ("0", "-0")] + ["-1"]
    if opt in ("--top-k", "--seed", "--shared-prefix", "--chunked-prefill", "--temperature"):
        bad = [v for v in bad if v not in ("0", "-0", "0x10", "١٢")]  # 0 is valid there
    return [cmd, opt, _pick(rng, bad)], {}


def _heavy_names(rng):
    cmd, opt = _pick(rng, [("generate", "--model"), ("generate", "--backend"), ("generate", "--dtype"),
                           ("kv-quality", "--methods"), ("kv-quality", "--out"), ("calibrate", "--name"),
                           ("calibrate", "--out-dir"), ("calibrate", "--backends"), ("serve-bench", "--trace"),
                           ("serve-bench", "--replay"), ("serve-bench", "--fit-steps"), ("serve-bench", "--input"),
                           ("serve-bench", "--backend"), ("serve-bench", "--model")])
    pool = {"--out": ["{tmp}/f", "/proc/x/y"], "--out-dir": ["{tmp}/f", "/proc/x/y", "/dev/null"],
            "--trace": ["{tmp}/t.csv"], "--replay": ["{tmp}/t.csv", "{tmp}/m.json"],
            "--fit-steps": ["{tmp}/t.csv", "{tmp}/m.json"], "--input": ["lognormal:1500:-1", "uniform:10:1", "x:1"],
            "--name": ["../x", "a/b", ".x", "x" * 100, "", "\x00"]}.get(opt, JUNK)
    val = _pick(rng, pool)
    if opt in ("--backend", "--dtype") and val.strip() in ("", "numpy", "torch", "fp32"):
        val = "weird"
    argv = [cmd, opt, val]
    if cmd == "generate" and opt == "--model":
        argv += ["--max-new-tokens", "0"]  # never load weights: the bad number fails first
    if cmd == "serve-bench" and opt not in ("--replay", "--fit-steps", "--trace"):
        argv += ["--requests", "0"]
    if cmd == "serve-bench" and opt == "--trace":
        argv += ["--requests", "0"]
    return argv, {"f": "a file", "t.csv": _trace(rng), "m.json": "{"}


GENERATORS = [_analyze_num, _analyze_names, _analyze_hw_file, _model_file, _framework_file, _sweep_axes,
              _sweep_names, _sweep_out, _plan_num, _plan_dist, _plan_trace, _simulate_num, _simulate_dist,
              _simulate_trace, _speculative, _compare, _report, _validate, _heavy_num, _heavy_names]


def _cases():
    out = []
    for g in GENERATORS:
        rng = random.Random(f"{g.__name__}-13")
        for i in range(N_PER_GENERATOR):
            argv, files = g(rng)
            out.append(pytest.param(argv, files, id=f"{g.__name__.strip('_')}-{i:03d}"))
    return out


# --- the contract --------------------------------------------------------------------------------------

class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang()


# keys whose values may be negative by meaning (a headroom that does not fit, a signed error)
SIGNED = re.compile(r"headroom|error|delta|diff|change|bias|log|saving", re.I)
BAD_TOKEN = re.compile(r"(?<![\w.])[-+]?(nan|inf|infinity)(?![\w])", re.I)


def _check_numbers(obj, where="$"):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"{where} = {obj}"
        assert obj >= 0 or SIGNED.search(where), f"{where} = {obj} is negative"
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        _check_numbers(v, f"{where}.{k}")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            rc = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue(), [str(w.message)[:200] for w in caught]


@pytest.mark.parametrize("argv,files", _cases())
def test_bad_input_is_one_line_or_a_sane_answer(argv, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default report folders land here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name, text in files.items():
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc, out, err, caught = _run(argv)
    except _Hang:
        pytest.fail(f"no end after {CASE_LIMIT_S} s")
    assert "Traceback" not in err, err[-2000:]
    assert not caught, f"warnings: {caught}"
    if rc == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("perfmodel: error: "), repr(err[:1000])
        assert len(lines[0]) <= 1100
    else:
        assert rc == 0, f"exit {rc}: {err[-500:]!r}"
        if "--format" in argv and argv[argv.index("--format") + 1] == "json" and out.strip():
            _check_numbers(json.loads(out))
        else:
            bad = BAD_TOKEN.findall(out)
            assert not bad, f"printed {bad[:5]}"
    left = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    assert not left, f"half-written: {left}"


def test_enough_cases_across_every_command():
    from perfmodel.cli.app import _register, app, command_name

    _register()
    cases = _cases()
    assert len(cases) >= 1000
    covered = {c.values[0][0] for c in cases}
    assert {command_name(i) for i in app.registered_commands} - {"models", "hardware", "frameworks"} <= covered


@pytest.mark.parametrize("argv,files", [
    (["simulate", "--rate", "nan"], {}), (["simulate", "--rate", "inf"], {}),
    (["simulate", "--chunked-prefill", "-1"], {}), (["simulate", "--chunked-prefill", "1"], {}),
    (["simulate", "--trace", "{tmp}/t.csv"], {"t.csv": "arrival_s,input_tokens,output_tokens\nnan,100,10\n"}),
    (["simulate", "--trace", "{tmp}/t.csv"], {"t.csv": "arrival_s,input_tokens,output_tokens\n0,-100,10\n"}),
    (["simulate", "--trace", "{tmp}/t.csv"], {"t.csv": "arrival_s,input_tokens,output_tokens\ninf,100,10\n"}),
    (["simulate", "--requests", "9223372036854775808"], {}), (["simulate", "--kv-blocks", "1"], {}),
], ids=["rate-nan", "rate-inf", "chunk-neg", "chunk-tiny", "trace-nan", "trace-neg", "trace-inf", "requests-big",
        "kv-one-block"])
def test_simulator_hang_cases_end_with_one_line(argv, files, tmp_path, monkeypatch):
    """The four inputs that used to hang the simulator (and their neighbours) are refused before the loop."""
    import time

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    t = time.perf_counter()
    rc, _, err, _ = _run([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2 and len(err.splitlines()) == 1 and time.perf_counter() - t < 5


def test_simulator_loop_is_bounded_even_when_the_kv_pool_thrashes():
    """Every scheduler iteration runs work or jumps to the next arrival; a pool that only ever preempts is
    stopped by the iteration bound with one error, not left spinning."""
    import numpy as np

    from perfmodel.errors import PerfmodelError
    from perfmodel.planning.deploy import Deployment
    from perfmodel.planning.simulate import SchedulerConfig, simulate
    from perfmodel.planning.workload import Requests
    from perfmodel.specs import load_hardware, load_model

    dep = Deployment(load_model("smollm2-135m"), load_hardware("h100-sxm"))
    n = 40
    reqs = Requests(np.zeros(n), np.full(n, 100), np.full(n, 60))
    try:
        r = simulate(dep, reqs, SchedulerConfig(max_batch=64, block_tokens=16, kv_blocks=11))
    except PerfmodelError as e:
        assert "no progress" in str(e) or "cannot" in str(e)
    else:
        assert r["requests"] == n and np.isfinite(r["duration_s"]) and r["duration_s"] > 0
