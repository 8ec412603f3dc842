"""Measured runs of any engine: read them, predict each, report the error, fit efficiency factors.

Formats: a CSV (model, hardware, batch, input, output and any of ttft_s/ttft_ms, tpot_s/tpot_ms, e2e_s,
tokens_per_s), the markdown table llama.cpp's llama-bench prints (pp<N> rows: prefill of N tokens; tg<N> rows:
decode), and the JSON that vLLM's benchmark scripts write (serving: mean_ttft_ms / mean_tpot_ms; latency:
avg_latency), for which --model, --hardware, --batch, --input, --output say what was run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.request import Workload, analyze
from pydantic import BaseModel

from perfmodel.errors import PerfmodelError, bad_value, short
from perfmodel.schemas import (TOKENS_MAX, count, is_dir, is_file, number, read_csv_strings, read_text, validate,
                               validate_column)
from perfmodel.specs import load_hardware, load_model
from perfmodel.specs.hardware import HardwareSpec

METRICS = ("ttft_s", "tpot_s", "e2e_s", "tokens_per_s")
WORKLOAD = ("model", "hardware", "batch", "input", "output")
MAX_ROWS = 100_000  # every row is one analysis
_MEASURED = number(gt=0)  # a measured time or rate: finite and positive
_TOKENS = count(1, TOKENS_MAX)


def read_measurements(path: Path, defaults: dict) -> pd.DataFrame:
    """Measured runs as a DataFrame (model, hardware, batch, input, output and the measured metrics; NaN where
    a row did not measure a metric). Every value is validated: '<file>: row N: <column>: <allowed>, got <v>'."""
    where = short(path)
    if is_dir(path):
        raise PerfmodelError(f"--measurements: {where}: is a folder, expected a file")
    if not is_file(path):
        raise PerfmodelError(f"--measurements: {path} not found")
    if path.suffix == ".json":
        try:
            d = json.loads(read_text(path, where))
        except json.JSONDecodeError as e:
            raise PerfmodelError(f"{where}: malformed JSON: {e.msg} at line {e.lineno}") from None
        except RecursionError:
            raise PerfmodelError(f"{where}: malformed JSON: nested too deeply") from None
        return _vllm_json(d, defaults, where)
    text = read_text(path, where)
    if not text.strip():
        raise PerfmodelError(f"{where}: empty file; expected a CSV, a llama-bench table or a vLLM JSON result")
    if "|" in text.splitlines()[0] and "t/s" in text:
        return _llama_bench(text, defaults, where)
    return _csv(path, defaults, where)


def _csv(path: Path, defaults: dict, where: str) -> pd.DataFrame:
    df = read_csv_strings(path, where)
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise PerfmodelError(f"{where}: no rows (a header and nothing measured)")
    if len(df) > MAX_ROWS:
        raise PerfmodelError(f"{where}: {len(df):,} rows; allowed: at most {MAX_ROWS:,}")
    scale = {}  # metric -> factor to seconds, for the columns given in milliseconds
    for ms in ("ttft", "tpot", "e2e"):
        if f"{ms}_ms" in df and f"{ms}_s" not in df:
            df[f"{ms}_s"] = df.pop(f"{ms}_ms")
            scale[f"{ms}_s"] = 1e-3
    out = {}
    for col in WORKLOAD:
        if col not in df:
            if defaults.get(col) is None:
                raise PerfmodelError(f"{where}: column {col!r} missing (or pass --{col})")
            df[col] = str(defaults[col])
        values = df[col].tolist()
        if col in ("model", "hardware"):
            bad = next((i for i, v in enumerate(values) if not v.strip()), None)
            if bad is not None:
                raise PerfmodelError(f"{where}: row {bad + 2}: {col}: must name a {col}, got ''")
            out[col] = [v.strip() for v in values]
        else:
            out[col] = validate_column(values, _TOKENS, where, col, first_row=2)
    present = [m for m in METRICS if m in df]
    if not present:
        raise PerfmodelError(f"{where}: no measured column; allowed: {', '.join(METRICS)} (or *_ms)")
    for m in present:
        values = df[m].tolist()
        given = [i for i, v in enumerate(values) if v.strip() != ""]  # an empty cell: not measured in that row
        name = m if m not in scale else m.replace("_s", "_ms")
        checked = validate_column([values[i] for i in given], _MEASURED, where, name, first_row=2, rows=given)
        col = np.full(len(values), np.nan)
        col[given] = np.asarray(checked, dtype=float) * scale.get(m, 1.0)
        out[m] = col
    measured = np.column_stack([np.isfinite(out[m]) for m in present]).any(axis=1)
    if not measured.all():
        raise PerfmodelError(f"{where}: row {int(np.argmin(measured)) + 2}: no measured value in "
                             f"{', '.join(present)}")
    return pd.DataFrame(out)


def _llama_bench(text: str, d: dict, where: str) -> pd.DataFrame:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 3:
        raise PerfmodelError(f"{where}: llama-bench table: no rows under the header")
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    if "test" not in header or "t/s" not in header:
        raise PerfmodelError(f"{where}: llama-bench table: the header needs 'test' and 't/s' columns")
    if d.get("model") is None or d.get("hardware") is None:
        raise PerfmodelError("llama-bench table: pass --model and --hardware (the table names a file, not a spec)")
    rows = []
    for k, ln in enumerate(lines[2:], start=3):
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        m = re.fullmatch(r"(pp|tg)(\d+)", cells.get("test", ""))
        if not m:
            continue
        tps = validate(_MEASURED, cells.get("t/s", "").split("±")[0].strip(), f"{where}: table row {k}: t/s")
        n = validate(_TOKENS, m.group(2), f"{where}: table row {k}: test")
        row = {"model": d["model"], "hardware": d["hardware"], "batch": d.get("batch") or 1}
        if m.group(1) == "pp":
            row.update(input=n, output=1, ttft_s=n / tps)
        else:
            row.update(input=d.get("input") or 1, output=n + 1, tpot_s=1 / tps)
        rows.append(row)
    if not rows:
        raise PerfmodelError(f"{where}: llama-bench table: no pp<N> or tg<N> rows")
    return pd.DataFrame(rows)


class _VllmResult(BaseModel):
    """The fields read from a vLLM benchmark JSON (serving or latency); others are ignored."""

    mean_ttft_ms: _MEASURED | None = None
    mean_tpot_ms: _MEASURED | None = None
    avg_latency: _MEASURED | None = None


def _vllm_json(d, defaults: dict, where: str) -> pd.DataFrame:
    if not isinstance(d, dict):
        raise PerfmodelError(f"{where}: expected a JSON object (a vLLM benchmark result), got {type(d).__name__}")
    need = [k for k in WORKLOAD if defaults.get(k) is None]
    if need:
        raise PerfmodelError(f"{where}: vLLM results do not say the workload; pass --{need[0]}")
    r = validate(_VllmResult, d, where)
    row = {k: defaults[k] for k in WORKLOAD}
    if r.mean_ttft_ms is not None:
        row.update(ttft_s=r.mean_ttft_ms / 1e3,
                   tpot_s=math.nan if r.mean_tpot_ms is None else r.mean_tpot_ms / 1e3)
    elif r.avg_latency is not None:
        row.update(e2e_s=r.avg_latency)
    else:
        raise PerfmodelError(f"{where}: no mean_ttft_ms or avg_latency; not a vLLM benchmark result")
    return pd.DataFrame([row])


def predict(df: pd.DataFrame, hw_override: HardwareSpec | None = None, precision: Precision | None = None,
            flash: bool = True) -> pd.DataFrame:
    out = []
    for r in df.itertuples(index=False):
        hw = hw_override or load_hardware(r.hardware)
        a = analyze(load_model(r.model), hw, Workload(int(r.batch), int(r.input), int(r.output)), precision, flash)
        q = a.request
        out.append({"pred_ttft_s": q["ttft_s"], "pred_tpot_s": q["tpot_s"], "pred_e2e_s": q["e2e_s"],
                    "pred_tokens_per_s": q["tokens_per_s"]})
    return pd.concat([df.reset_index(drop=True), pd.DataFrame(out)], axis=1)


def errors(pred: pd.DataFrame) -> list[dict]:
    rows = []
    for m in METRICS:
        if m not in pred:
            continue
        meas, p = pred[m].to_numpy(dtype=float), pred[f"pred_{m}"].to_numpy(dtype=float)
        ok = np.isfinite(meas) & (meas > 0)
        if not ok.any():
            continue
        e = np.abs(p[ok] - meas[ok]) / meas[ok] * 100
        rows.append({"metric": m, "n": int(ok.sum()), "median_ape_pct": float(np.median(e)),
                     "p90_ape_pct": float(np.percentile(e, 90)), "max_ape_pct": float(e.max())})
    return rows


def fit_efficiency(df: pd.DataFrame, hw: HardwareSpec, precision=None, flash=True) -> tuple[HardwareSpec, float]:
    """Compute and memory efficiency minimising the squared log error over every measured metric:
    a coarse log grid, then a finer one around the best point."""

    def loss(c, m):
        cand = dataclasses.replace(hw, efficiency=hw.efficiency.scaled(float(c), float(m)))
        pred = predict(df, cand, precision, flash)
        err = 0.0
        for k in METRICS:
            if k in pred:
                meas, p = pred[k].to_numpy(dtype=float), pred[f"pred_{k}"].to_numpy(dtype=float)
                ok = np.isfinite(meas) & (meas > 0)
                err += float((np.log(p[ok] / meas[ok]) ** 2).sum())
        return err, cand

    best = (np.inf, hw, 0.5, 0.5)
    cs = ms = np.geomspace(0.05, 1.0, 12)
    for _ in range(3):  # each pass narrows the grid around the best point
        for c in cs:
            for m in ms:
                err, cand = loss(c, m)
                if err < best[0]:
                    best = (err, cand, c, m)
        step = (cs[1] / cs[0]) if len(cs) > 1 else 1.1
        cs = np.clip(best[2] * np.geomspace(1 / step, step, 7), 0.01, 1.0)
        ms = np.clip(best[3] * np.geomspace(1 / step, step, 7), 0.01, 1.0)
    return best[1], best[0]


# ---------------------------------------------------------------------------------------------------------------
# Published measurements (perfmodel/data/measurements.csv and any CSV in its schema): one row per printed number.
#
# Conventions of the prediction (the same for the nominal, the fitted and the pure-roofline figures):
# - Latency rows: TTFT is the prefill of the row's batch (batch 1 unless stated); TPOT the mean decode step; an
#   end-to-end latency is the prefill plus output-1 decode steps of the batch, each step against the grown cache
#   (perfmodel.costmodel.request.analyze for one device; the same operators split by perfmodel.costmodel.parallel
#   with their collectives for tensor parallelism).
# - Throughput rows (static batch, a concurrency, or offline): the steady state of B concurrent requests is taken
#   as B requests that start together: one batched prefill, then output-1 decode steps at batch B, so the rate is
#   B*output/(prefill + decode steps). Decode dominates for long outputs; mixing prefill chunks into decode steps
#   (which shares their weight reads) is not modelled. When the source prints no batch (an offline max-throughput
#   run), B is the largest batch whose KV cache fits beside the weights (perfmodel.planning.deploy.max_batch, 10 %
#   reserve, at most 4096); the roofline bound uses every byte of memory instead, the largest batch physically
#   possible.
# - llama-bench: pp N is one prefill of N tokens (tokens/s = N/prefill); tg N is N decode steps from an empty cache.
# - A row's KV dtype left blank (not stated by the source) is predicted in its activation dtype.
# - Scenarios marked "pad-token inputs" (TensorRT-LLM's gptSessionBenchmark fills every input with the pad token and
#   decodes greedily) run identical sequences of identical tokens: every token routes to the same k experts, so a
#   MoE step reads k experts, not the distinct experts of independent tokens.
# ---------------------------------------------------------------------------------------------------------------

PUBLISHED_COLUMNS = (
    "source", "source_date_or_commit", "framework", "framework_version", "model", "model_id", "weight_dtype",
    "activation_dtype", "kv_dtype", "hardware", "gpus", "tp", "pp", "ep", "batch_or_concurrency", "input_tokens",
    "output_tokens", "metric", "value", "unit", "per", "scenario", "notes")
LATENCY_METRICS = ("ttft_s", "tpot_s", "e2e_s")
RATE_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s",
                "requests_per_s")
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "tokens/s": 1.0, "requests/s": 1.0}
FIT_STEP_SAMPLES = 24  # decode steps sampled per row inside the fit's objective (reported figures use every step)


def builtin_measurements_path() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "measurements.csv"


def is_published_csv(path: Path) -> bool:
    """True for 'builtin' and for a CSV whose header holds the published-measurements columns."""
    if str(path) == "builtin":
        return True
    if path.suffix != ".csv" or not path.is_file():
        return False
    header = path.read_text().splitlines()[:1]
    cols = set(header[0].split(",")) if header else set()
    return {"source", "framework", "metric", "value", "unit", "per"} <= cols


def read_published(path: Path | str = "builtin") -> pd.DataFrame:
    """The published-measurements table; `row` numbers each row as its line in the file (header = line 1)."""
    p = builtin_measurements_path() if str(path) == "builtin" else Path(path)
    if not p.is_file():
        raise PerfmodelError(f"--measurements: {p} not found")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    missing = [c for c in PUBLISHED_COLUMNS if c not in df.columns]
    if missing:
        raise PerfmodelError(f"{p}: column {missing[0]!r} missing; the published-measurements schema has "
                             + ", ".join(PUBLISHED_COLUMNS))
    for i, r in df.iterrows():
        where = f"{p} line {i + 2}"
        if not r["source"].strip():
            raise PerfmodelError(f"{where}: source: empty; every row needs a URL")
        if r["unit"] not in UNITS:
            raise bad_value(f"{where}: unit", r["unit"], "|".join(UNITS))
        if r["per"] not in ("gpu", "system", "request"):
            raise bad_value(f"{where}: per", r["per"], "gpu|system|request")
        try:
            if not float(r["value"]) > 0:
                raise ValueError
        except ValueError:
            raise bad_value(f"{where}: value", r["value"], "a positive number") from None
    df.insert(0, "row", np.arange(len(df)) + 2)
    return df


def _int(s: str, default: int | None = None) -> int | None:
    s = str(s).strip()
    if not s:
        return default
    return int(float(s))


# operator groups a framework's fit may slow down or speed up: attention, MoE experts, and the matmuls whose weights
# are dequantised on the way (a format the GEMM does not take natively: GGUF blocks, AWQ/GPTQ int4, fp8 on a chip
# without fp8 tensor cores), whose kernels (mat-vec with in-register dequantisation, dequantise-then-GEMM) run
# slower than the 16-bit ones at the same bytes and FLOPs
GROUPS = ("other", "attention", "moe", "dequant")


def _group(op, precision: Precision | None = None) -> int:
    if op.kind == "attention" or op.name in ("qk", "softmax", "av"):
        return 1
    if op.name.startswith("expert_"):
        return 2
    if precision is not None and op.kind == "matmul" and _dequantised(precision):
        return 3
    return 0


def _dequantised(precision: Precision) -> bool:
    from perfmodel.dtypes import get_dtype

    return get_dtype(precision.weights).native != precision.compute_dtype


# The fitted numbers of one framework. The first four are a framework profile's own fields (perfmodel.frameworks):
# multipliers on the hardware's nominal compute and memory efficiency, an attention-kind multiplier (on both) and
# the host overhead per serving step (prefill and each decode step). The others the cost model has no profile field
# for yet; validate applies them and a written profile carries them in its provenance.
PROFILE_PARAMS = ("compute_multiplier", "memory_multiplier", "attention_multiplier", "host_overhead_us")
EXTRA_PARAMS = ("prefill_overhead_us", "collective_latency_us", "moe_multiplier", "matmul_half_dim",
                "dequant_multiplier")
DEFAULT_PARAMS = {"compute_multiplier": 1.0, "memory_multiplier": 1.0, "attention_multiplier": 1.0,
                  "host_overhead_us": 0.0, "prefill_overhead_us": 0.0, "collective_latency_us": 0.0,
                  "moe_multiplier": 1.0, "matmul_half_dim": 0.0, "dequant_multiplier": 1.0}
# where the data cannot tell, a multiplier stays near 1 (the shipped profile's): a log-space prior of weight 1
PRIOR = ("compute_multiplier", "memory_multiplier", "attention_multiplier", "moe_multiplier", "dequant_multiplier")
# Per hardware family and per hardware (a profile's efficiency keys, perfmodel.frameworks.hardware_family): compute
# and memory multipliers on top of the framework-wide ones, fitted where the rows hold that family or machine and
# pulled towards 1 (the level above) by the same log-space prior, so a family seen once moves less than its data
# alone would say and a machine of a family the fit never saw gets the framework-wide numbers.
LEVELS = ("family", "hardware")
# machines of one family share architecture and kernels: a machine departs from its family only where its rows
# insist (a prior 4x the family's), so what one machine shows mostly goes to its family and carries to the others
LEVEL_PRIOR = {"family": 1.0, "hardware": 4.0}


def _level_key(level: str, hw: HardwareSpec) -> str:
    from perfmodel.frameworks import hardware_family

    return hardware_family(hw) if level == "family" else hw.name


def efficiency_multipliers(params: dict, hw: HardwareSpec) -> tuple[float, float]:
    """The compute and memory multipliers a fit gives one machine: framework-wide x its family's x its own."""
    c, m = params.get("compute_multiplier", 1.0), params.get("memory_multiplier", 1.0)
    for level in LEVELS:
        got = (params.get(f"{level}_efficiency") or {}).get(_level_key(level, hw)) or {}
        c *= got.get("compute", 1.0)
        m *= got.get("memory", 1.0)
    return c, m


# GGUF file types that mix K-quants (llama.cpp src/llama.cpp llama_tensor_get_type, 2023-06 .. 2024): the base
# format for every weight, Q6_K for the output matrix, and Q6_K for attn_v and ffn_down in the layers
# use_more_bits picks (the first and last eighth, every third between) in the _M mixes; 70B-class models (8 query
# heads per KV head) keep attn_v at Q5_K at least. Checked against the published file sizes: Llama-3-8B Q4_K_M
# 4.58 GiB and Llama-3-70B Q4_K_M 39.6 GiB (XiongjieDai/GPU-Benchmarks-on-LLM-Inference README) -> 4.57 and 39.6.
GGUF_MIXES = {"q4_k_m": ("q4_k", True), "q5_k_m": ("q5_k", True), "q5_k_s": ("q5_k", False), "q4_k_s": ("q4_k", False)}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_mix_factors(model, mix: str) -> dict[str, float]:
    """Weight-byte factors per operator name of a GGUF mix over its base format (1 where the base holds)."""
    from perfmodel.dtypes import bytes_per_element

    base, more = GGUF_MIXES[mix]
    b, q6, q5 = (bytes_per_element(d) for d in (base, "q6_k", "q5_k"))
    n = model.num_layers
    upgraded = sum(_use_more_bits(i, n) for i in range(n)) / n if more else 0.0
    v_other = q5 / b if (model.num_heads // max(model.num_kv_heads, 1) >= 8 and b < q5) else 1.0
    return {"lm_head": q6 / b, "down_proj": upgraded * q6 / b + (1 - upgraded),
            "v_proj": upgraded * q6 / b + (1 - upgraded) * v_other}


def collectives_per_pass(model, par) -> int:
    """All-reduces (2 per layer under tensor parallelism), all-to-alls (2 per MoE layer under expert parallelism)
    and pipeline sends of one forward pass: each pays the framework's collective latency."""
    n = 2 * model.num_layers if par.tp > 1 else 0
    if model.is_moe and par.ep > 1:
        n += 2 * model.moe_layers
    return n + par.pp - 1


@dataclasses.dataclass
class _Phase:
    """One phase of one row: per-op compute and memory seconds at efficiency 1 (layers folded in), shape (ops,)
    for prefill and (ops, steps) for decode; each op's group (GROUPS) and its smallest matmul dimension (NaN for
    other operators); floor_s is the shortest a graph-replayed kernel takes, times the op's layers; launch_s is the
    forward's own host cost per pass (one graph launch, or the eager host glue); comm_s the collectives' seconds
    summed over the phase's passes."""

    compute: np.ndarray
    memory: np.ndarray
    group: np.ndarray
    min_dim: np.ndarray
    floor_s: np.ndarray
    passes: int
    launch_s: float
    comm_s: float
    collectives: int  # per pass

    def group_seconds(self, c: float = 1.0, m: float = 1.0, half_dim: float = 0.0, floor: bool = True,
                      div=(1.0,) * len(GROUPS)) -> np.ndarray:
        """Seconds per operator group at compute and memory efficiency c and m, each group's efficiencies times
        its multiplier in div (as a profile's per-kind multipliers scale both), a kernel taking at least its
        floor; a matmul of smallest dimension d reaches c*d/(d+half_dim)."""
        ce = np.full(len(self.group), c)
        if half_dim:
            d = self.min_dim
            ce = np.where(np.isnan(d), c, c * d / (d + half_dim))
        shape = (-1,) + (1,) * (self.compute.ndim - 1)
        t = np.maximum(self.compute / ce.reshape(shape), self.memory / m) / np.asarray(div)[self.group].reshape(shape)
        if floor:
            t = np.maximum(t, self.floor_s.reshape(shape))
        t = t.reshape(t.shape[0], -1).sum(axis=1)
        return np.bincount(self.group, weights=t, minlength=len(GROUPS))

    def roofline_s(self) -> float:
        """Efficiency 1, no floors, launches or collectives: the bound no run can beat."""
        return float(self.group_seconds(floor=False, div=(1.0,) * len(GROUPS)).sum())


@dataclasses.dataclass
class _Expressed:
    """A row as the cost model sees it: model, hardware, parallelism, precision, the framework's profile."""

    row: int
    metric: str
    measured: float  # SI units (seconds, or per second)
    batch: int
    input_tokens: int
    output_tokens: int
    steps: int
    divide: float  # per-GPU figures divide the system figure by this
    model: object
    hw: HardwareSpec  # the library hardware
    par: object
    precision: Precision
    decode_only: bool
    per: str
    identical: bool  # every sequence and token the same (pad-token benchmark inputs): MoE routes as one token
    exec_mode: str
    profile: object  # perfmodel.frameworks.FrameworkProfile or None
    hw_run: HardwareSpec  # the hardware as the framework's shipped profile runs it
    mix: str = ""  # a GGUF mix (GGUF_MIXES): precision.weights is its base format, the mixed tensors heavier
    flash: bool = True  # the framework's attention keeps scores on chip (FlashAttention-style)


@functools.lru_cache(maxsize=None)
def _library_hardware(name: str) -> HardwareSpec:
    return load_hardware(name)  # parsed once per process: a published set names the same few accelerators


def express_row(r) -> _Expressed | str:
    """The row in the cost model's terms, or the reason it cannot be expressed (a string)."""
    from perfmodel.costmodel.execution import DEFAULT_EXEC
    from perfmodel.costmodel.parallel import Parallelism
    from perfmodel.dtypes import get_dtype
    from perfmodel.frameworks import apply_framework, list_frameworks

    metric = r["metric"]
    if metric not in LATENCY_METRICS + RATE_METRICS:
        if metric == "tokens_per_s":
            return "the source's tokens/s does not say whether input tokens are counted (output or total)"
        return f"metric {metric!r} is not one the cost model predicts"
    try:
        model = load_model(r["model"])
    except PerfmodelError:
        return f"model {r['model']!r} is not in the perfmodel library"
    try:
        hw = _library_hardware(r["hardware"])
    except PerfmodelError:
        return f"hardware {r['hardware']!r} is not in the perfmodel library"
    if not model.is_decoder_only:
        return f"model {model.name} is not decoder-only"
    for field in ("weight_dtype", "activation_dtype"):
        if not r[field]:
            return f"{field.replace('_', ' ')} not stated by the source"
    kv = r["kv_dtype"] or r["activation_dtype"]
    mix = r["weight_dtype"].lower() if r["weight_dtype"].lower() in GGUF_MIXES else ""
    weights = GGUF_MIXES[mix][0] if mix else r["weight_dtype"]
    for field, v in (("weight dtype", weights), ("activation dtype", r["activation_dtype"]),
                     ("kv dtype", kv)):
        try:
            get_dtype(v)
        except PerfmodelError:
            return f"{field} {v!r} is not a perfmodel format"
    precision = Precision(weights, r["activation_dtype"], kv)
    try:
        hw.peak_flops(precision.compute_dtype)
    except PerfmodelError:
        return f"hardware {hw.name} lists no {precision.compute_dtype} peak"
    inp = _int(r["input_tokens"])
    out = _int(r["output_tokens"], 0)
    if inp is None:
        return "input length not published by the source"
    tp, pp, ep = _int(r["tp"], 1), _int(r["pp"], 1), _int(r["ep"], 1)
    gpus = _int(r["gpus"], tp * pp)
    if pp > 1:
        return "pipeline-parallel rows are not expressed yet (stage overlap of the framework unknown)"
    if gpus != tp * (ep if ep > tp else 1):
        return f"{gpus} GPUs with tp {tp}: data-parallel or disaggregated layouts are not expressed"
    try:
        par = Parallelism(tp=tp, ep=ep)
        par.check(model)
    except PerfmodelError as e:
        return str(e)
    decode_only = r["scenario"].startswith("llama-bench tg")
    if metric == "prefill_tokens_per_s" and inp < 1:
        return "a prefill rate needs an input length"
    if decode_only:
        steps = out
    elif metric in ("ttft_s", "prefill_tokens_per_s"):
        steps = 0
    else:
        if out < 2:
            return "a decode figure needs at least two output tokens"
        steps = out - 1
    profiles = {f.name: f for f in list_frameworks()}
    prof = profiles.get(r["framework"])
    exec_mode = prof.exec_mode if prof else DEFAULT_EXEC
    hw_run = apply_framework(hw, prof) if prof else hw
    batch = _int(r["batch_or_concurrency"], 0)
    divide = float(gpus) if r["per"] == "gpu" else 1.0
    measured = float(r["value"]) * UNITS[r["unit"]]
    return _Expressed(int(r["row"]), metric, measured, batch, inp, out, steps, divide, model, hw, par, precision,
                      decode_only, r["per"], "pad-token inputs" in r["scenario"], exec_mode, prof, hw_run, mix)


def _unit_hardware(hw: HardwareSpec) -> HardwareSpec:
    """The datasheet roofs as they are: efficiency 1, no launch or dispatch overheads, no kernel floor."""
    from perfmodel.specs.hardware import Efficiency

    return dataclasses.replace(hw, efficiency=Efficiency(compute=1.0, memory=1.0), launch_overhead_us=0.0,
                               kernel_min_us=0.0, graph_launch_us=0.0, host_overhead_us=0.0)


def _ops(e: _Expressed, batch, new, past, phase):
    from perfmodel.costmodel.operators import phase_ops
    from perfmodel.costmodel.parallel import comm_seconds, split_ops

    touched = None
    if e.identical and e.model.is_moe:  # identical tokens route to the same k experts, whatever the batch
        from perfmodel.costmodel.operators import expected_experts_touched

        touched = expected_experts_touched(e.model.num_experts, e.model.experts_per_token, 1)
    ops = phase_ops(e.model, batch, new, past, e.precision, e.flash, experts_touched=touched, phase=phase,
                    exec_mode=e.exec_mode)
    if e.mix:
        f = gguf_mix_factors(e.model, e.mix)
        ops = [dataclasses.replace(o, weight_bytes=o.weight_bytes * f[o.name]) if o.name in f else o for o in ops]
    ops = split_ops(ops, e.par, e.model)
    comm = sum(comm_seconds(e.model, e.par, e.hw, np.asarray(batch) * np.asarray(new), e.precision).values())
    return ops, float(np.sum(comm))


def _phase_arrays(e: _Expressed, ops, steps: int | None, comm_s: float) -> _Phase:
    from perfmodel.costmodel.execution import launches_per_op
    from perfmodel.costmodel.roofline import host_op, op_timing, op_timings

    # the roofs as the framework runs on them (its GEMMs' peak, e.g. fp16 accumulation), efficiency 1
    t = op_timings(ops, _unit_hardware(e.hw_run), e.precision, e.exec_mode, host=False)
    group = np.array([_group(x.op, e.precision) for x in t], dtype=np.int64)
    min_dim = np.array([float(np.max(x.op.min_dim)) if x.op.min_dim is not None and x.op.kind in
                        ("matmul", "attention") else np.nan for x in t])
    graph = not launches_per_op(e.exec_mode)
    floor = np.array([e.hw.kernel_min_us * 1e-6 * x.op.layers if graph else 0.0 for x in t])
    launch = float(op_timing(host_op(ops, e.hw_run, e.exec_mode), e.hw_run, e.precision, e.exec_mode).time_s)
    coll = collectives_per_pass(e.model, e.par)
    if steps is None:  # prefill: scalars per op
        comp = np.array([float(np.sum(x.compute_s)) * x.op.layers for x in t])
        mem = np.array([float(np.sum(x.memory_s)) * x.op.layers for x in t])
        return _Phase(comp, mem, group, min_dim, floor, 1, launch, comm_s, coll)
    comp = np.stack([np.broadcast_to(np.asarray(x.compute_s, dtype=np.float64), (steps,)) * x.op.layers for x in t])
    mem = np.stack([np.broadcast_to(np.asarray(x.memory_s, dtype=np.float64), (steps,)) * x.op.layers for x in t])
    return _Phase(comp, mem, group, min_dim, floor, steps, launch, comm_s, coll)


def max_fitting_batch(e: _Expressed, reserve: bool = True) -> int:
    """The offline batch: deploy.max_batch (10 % reserve, activations, at most 4096), or with reserve=False the
    most sequences whose KV cache physically fits beside the weights (the roofline's batch)."""
    from perfmodel.costmodel.operators import kv_cache_bytes, weight_memory_bytes
    from perfmodel.planning.deploy import Deployment, max_batch

    tokens = e.input_tokens + e.output_tokens
    if reserve:
        return max_batch(Deployment(e.model, e.hw, e.par, e.precision), tokens)
    shards = e.par.tp
    free = e.hw.memory_capacity - weight_memory_bytes(e.model, e.precision) / shards
    per_seq = float(kv_cache_bytes(e.model, tokens, 1, e.precision.kv_cache)) / shards
    return int(max(free // per_seq, 0))


def _build(e: _Expressed, batch: int) -> dict:
    """The per-device operators and collective seconds of the row's phases at `batch`: 'pre' (absent for a
    llama-bench tg row) and 'dec' (absent when the metric needs no decode step)."""
    built = {}
    if not e.decode_only:
        built["pre"] = _ops(e, batch, e.input_tokens, 0, "prefill")
    if e.steps:
        built["dec"] = _ops(e, batch, 1, e.input_tokens + np.arange(e.steps), "decode")
    return built


def _phases(e: _Expressed, built: dict) -> tuple[_Phase | None, _Phase | None]:
    pre = _phase_arrays(e, built["pre"][0], None, built["pre"][1]) if "pre" in built else None
    dec = _phase_arrays(e, built["dec"][0], e.steps, built["dec"][1]) if "dec" in built else None
    return pre, dec


def metric_value(e: _Expressed, batch: int, pre_s: float, dec_s: float) -> float:
    """The row's metric from the prefill and total decode seconds of `batch` sequences run together."""
    m, total = e.metric, pre_s + dec_s
    if m == "ttft_s":
        return pre_s
    if m == "tpot_s":
        return dec_s / e.steps
    if m == "e2e_s":
        return total
    # a rate per request is one sequence's; per system the batch's; per GPU the batch's over the GPUs
    scale = 1.0 if e.per == "request" else batch / e.divide
    if m == "decode_tokens_per_s":
        return scale * e.steps / dec_s
    if m == "prefill_tokens_per_s":
        return scale * e.input_tokens / pre_s
    if m == "output_tokens_per_s":
        return scale * e.output_tokens / total
    if m == "total_tokens_per_s":
        return scale * (e.input_tokens + e.output_tokens) / total
    return scale / total  # requests_per_s


@dataclasses.dataclass
class RowEval:
    """One expressed row: its phases at the predicted batch and the figures."""

    e: _Expressed
    framework: str
    source: str
    batch: int
    pre: _Phase | None
    dec: _Phase | None
    nominal: float  # the cost model as it is: library hardware under the framework's shipped profile
    roofline: float  # efficiency 1, no launch/dispatch overheads, no communication, the largest possible batch

    def seconds(self, params: dict) -> tuple[float, float]:
        """Prefill and decode seconds under a framework's fitted numbers: the hardware's nominal efficiencies
        times the compute and memory multipliers (at most 1, as a profile applies them), attention and
        MoE-expert operators' times divided by their multipliers, kernel floors and the forward's launch as the
        exec mode has them, the host overhead on every step (prefill included) plus the prefill overhead,
        collectives at the link's datasheet rate plus the latency per collective."""
        p = {**DEFAULT_PARAMS, **params}
        eff = self.e.hw.efficiency
        cm, mm = efficiency_multipliers(p, self.e.hw)
        c = min(1.0, eff.compute * cm)
        m = min(1.0, eff.memory * mm)
        div = np.array([1.0, p["attention_multiplier"], p["moe_multiplier"], p["dequant_multiplier"]])
        coll, host = p["collective_latency_us"] * 1e-6, p["host_overhead_us"] * 1e-6
        out = []
        for ph, extra in ((self.pre, p["prefill_overhead_us"] * 1e-6), (self.dec, 0.0)):
            if ph is None:
                out.append(0.0)
                continue
            body = float(ph.group_seconds(c, m, p["matmul_half_dim"], div=div).sum())
            out.append(body + ph.comm_s + (ph.launch_s + host + coll * ph.collectives) * ph.passes + extra)
        return out[0], out[1]

    def predict(self, params: dict) -> float:
        return metric_value(self.e, self.batch, *self.seconds(params))


def _nominal_seconds(e: _Expressed, ops_comm, passes: int = 1) -> float:
    """The cost model as it is (the hardware under the framework's shipped profile, in its exec mode, with the
    forward's launch and the host overhead per step) plus collectives: analyze's own figure on one device."""
    from perfmodel.costmodel.roofline import op_timings, phase_summary

    if ops_comm is None:
        return 0.0
    ops, comm = ops_comm
    body = np.broadcast_to(phase_summary(op_timings(ops, e.hw_run, e.precision, e.exec_mode))["time_s"], (passes,))
    return float(np.sum(body)) + comm + e.hw_run.host_overhead_us * 1e-6 * passes


def evaluate_row(e: _Expressed, framework: str = "", source: str = "") -> RowEval:
    """Phases at the predicted batch (the row's, or the largest that fits), nominal and roofline figures."""
    batch = e.batch or max(max_fitting_batch(e, reserve=True), 1)
    built = _build(e, batch)
    pre, dec = _phases(e, built)
    nominal = metric_value(e, batch, _nominal_seconds(e, built.get("pre")),
                           _nominal_seconds(e, built.get("dec"), max(e.steps, 1)))
    rb, rpre, rdec = batch, pre, dec
    if not e.batch:  # the bound runs the largest batch memory could hold
        rb = max(max_fitting_batch(e, reserve=False), 1)
        rpre, rdec = _phases(e, _build(e, rb))
    roof = metric_value(e, rb, rpre.roofline_s() if rpre else 0.0, rdec.roofline_s() if rdec else 0.0)
    return RowEval(e, framework, source, batch, pre, dec, nominal, roof)


_SIXTEEN_BIT = ("fp16", "bf16")
_RUN_KEYS = ("source", "framework", "hardware", "model", "gpus", "tp", "batch_or_concurrency", "input_tokens",
             "output_tokens", "metric", "scenario")


def contradicted_rows(df: pd.DataFrame) -> dict[int, str]:
    """Rows that contradict their own source, by row number, with the reason. A prefill rate with 16-bit weights
    lower than the same source's rate for the same run (hardware, model, lengths) with block-quantised weights:
    a dequantising GEMM does the 16-bit GEMM's work and more, so the 16-bit run took some other (fallback) path
    that the cost model has no way to express. Decided from the measured values alone, before any prediction."""
    from perfmodel.dtypes import DTYPES

    out: dict[int, str] = {}
    pre = df[df["metric"] == "prefill_tokens_per_s"]
    quant = pre["weight_dtype"].str.lower().map(lambda w: w in GGUF_MIXES or DTYPES.get(w, DTYPES["fp16"]).is_block)
    for _, g in pre.groupby(list(_RUN_KEYS), sort=False):
        q = g[quant.loc[g.index]]
        if q.empty:
            continue
        best = q.loc[q["value"].astype(float).idxmax()]
        for _, r in g[g["weight_dtype"].str.lower().isin(_SIXTEEN_BIT)].iterrows():
            if float(r["value"]) < float(best["value"]):
                out[int(r["row"])] = ("contradicts its source: a 16-bit prefill slower than the same run with "
                                      "block-quantised weights (a fallback kernel the cost model cannot express)")
    return out


def evaluate_published(df: pd.DataFrame, progress=None) -> tuple[list[RowEval], list[dict]]:
    """Every row expressed and evaluated, or listed with the reason it cannot be (never dropped)."""
    evals, unexpressed = [], []
    contradicted = contradicted_rows(df)
    for _, r in df.iterrows():
        e = contradicted.get(int(r["row"])) or express_row(r)
        if isinstance(e, str):
            unexpressed.append({"row": int(r["row"]), "framework": r["framework"], "hardware": r["hardware"],
                                "model": r["model"], "metric": r["metric"], "source": r["source"], "reason": e})
        else:
            evals.append(evaluate_row(e, r["framework"], r["source"]))
        if progress:
            progress()
    return evals, unexpressed


def split_by_source(df: pd.DataFrame, counts: dict | None = None) -> dict[str, int]:
    """Half 0 (fit) or 1 (held out) for every source, so that no source is in both halves. Deterministic: within
    each framework, sources in order of falling row count (then name) go to the half with fewer rows so far.
    `counts` (source -> rows) weighs the balance, by default the rows in df."""
    half: dict[str, int] = {}
    for fw, g in df.groupby("framework", sort=True):
        n = counts if counts is not None else g["source"].value_counts().to_dict()
        size = [0, 0]
        for src in sorted(g["source"].unique(), key=lambda s: (-n.get(s, 0), s)):
            if src in half:  # a source shared by two frameworks stays where it first went
                continue
            h = 0 if size[0] <= size[1] else 1
            half[src] = h
            size[h] += n.get(src, 0)
    return half


ALL_METRICS = "all metrics"


def error_table(evals: list[RowEval], which: str, params: dict | None = None) -> list[dict]:
    """n, median and p90 |error| and signed bias (median signed error, + = predicted too high) per framework and
    metric, in %, and over all metrics of a framework that has several (metric ALL_METRICS). which: nominal |
    roofline | fitted (with params: framework -> fitted numbers)."""
    groups: dict[tuple, list[float]] = {}
    for r in evals:
        if which == "fitted":
            if r.framework not in (params or {}):
                continue
            pred = r.predict(params[r.framework])
        else:
            pred = getattr(r, which)
        groups.setdefault((r.framework, r.e.metric), []).append(pred / r.e.measured - 1.0)
    pooled: dict[tuple, list[float]] = {}
    for (fw, m), errs in groups.items():  # every metric of a framework together: the figure the framework gets
        pooled.setdefault((fw, ALL_METRICS), []).extend(errs)
    groups.update({k: v for k, v in pooled.items() if len([g for g in groups if g[0] == k[0]]) > 1})
    out = []
    for (fw, m), errs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == ALL_METRICS, kv[0][1])):
        e = np.asarray(errs) * 100
        out.append({"framework": fw, "metric": m, "n": len(e), "median_abs_pct": float(np.median(np.abs(e))),
                    "p90_abs_pct": float(np.percentile(np.abs(e), 90)), "bias_pct": float(np.median(e))})
    return out


_METRIC_CODES = {m: i for i, m in enumerate(LATENCY_METRICS + RATE_METRICS)}


def _metric_vec(code, scale, steps, inp, out, pre, dec):
    """metric_value over arrays of rows (code: _METRIC_CODES)."""
    total = pre + dec
    with np.errstate(divide="ignore", invalid="ignore"):
        cand = [pre, dec / np.maximum(steps, 1), total, scale * steps / dec, scale * inp / pre, scale * out / total,
                scale * (inp + out) / total, scale / total]
    return np.choose(code, cand)


class _FitData:
    """The training rows of one framework flattened for a fast objective: per op and sampled decode step, its
    compute and memory seconds at efficiency 1, kernel floor, row, phase and group."""

    def __init__(self, rows: list[RowEval]):
        parts = {k: [] for k in ("cs", "ms", "fl", "wt", "seg", "md", "bc", "bm", "row")}
        self.n = len(rows)
        for k, r in enumerate(rows):
            eff = r.e.hw.efficiency
            for ph, phase in enumerate((r.pre, r.dec)):
                if phase is None:
                    continue
                c, m, w = phase.compute, phase.memory, 1.0
                if c.ndim == 2 and c.shape[1] > FIT_STEP_SAMPLES:
                    idx = np.unique(np.linspace(0, c.shape[1] - 1, FIT_STEP_SAMPLES).round().astype(int))
                    w = c.shape[1] / len(idx)
                    c, m = c[:, idx], m[:, idx]
                col = (lambda a: np.broadcast_to(a[:, None], c.shape)) if c.ndim == 2 else (lambda a: a)  # noqa: E731
                parts["cs"].append(c.ravel())
                parts["ms"].append(m.ravel())
                parts["fl"].append(col(phase.floor_s).ravel())
                parts["md"].append(col(phase.min_dim).ravel())
                parts["seg"].append(((k * 2 + ph) * len(GROUPS) + col(phase.group)).ravel())
                parts["wt"].append(np.full(c.size, w))
                parts["bc"].append(np.full(c.size, eff.compute))
                parts["bm"].append(np.full(c.size, eff.memory))
                parts["row"].append(np.full(c.size, k))
        for key, v in parts.items():
            setattr(self, key, np.concatenate(v))
        self.is_mm = ~np.isnan(self.md)
        self.md = np.where(self.is_mm, self.md, 1.0)
        # each row's family and machine, as indices into the sorted keys the rows hold
        self.keys = {lv: sorted({_level_key(lv, r.e.hw) for r in rows}) for lv in LEVELS}
        self.key_of = {lv: np.array([self.keys[lv].index(_level_key(lv, r.e.hw)) for r in rows]) for lv in LEVELS}
        f = lambda fn: np.array([fn(r) for r in rows], dtype=np.float64)  # noqa: E731
        self.passes = np.stack([f(lambda r: 1 if r.pre is not None else 0),
                                f(lambda r: r.dec.passes if r.dec is not None else 0)], axis=1)
        self.fixed = np.stack([f(lambda r: (r.pre.comm_s + r.pre.launch_s) if r.pre else 0.0),
                               f(lambda r: (r.dec.comm_s + r.dec.launch_s * r.dec.passes) if r.dec else 0.0)], axis=1)
        self.coll = f(lambda r: (r.pre or r.dec).collectives)
        self.code = np.array([_METRIC_CODES[r.e.metric] for r in rows])
        self.scale = f(lambda r: 1.0 if r.e.per == "request" else r.batch / r.e.divide)
        self.steps = f(lambda r: r.e.steps)
        self.inp, self.out = f(lambda r: r.e.input_tokens), f(lambda r: r.e.output_tokens)
        self.measured = f(lambda r: r.e.measured)

    def row_multipliers(self, p: dict) -> tuple[np.ndarray, np.ndarray]:
        c = np.full(self.n, p["compute_multiplier"])
        m = np.full(self.n, p["memory_multiplier"])
        for lv in LEVELS:
            table = p.get(f"{lv}_efficiency") or {}
            c = c * np.array([table.get(k, {}).get("compute", 1.0) for k in self.keys[lv]])[self.key_of[lv]]
            m = m * np.array([table.get(k, {}).get("memory", 1.0) for k in self.keys[lv]])[self.key_of[lv]]
        return c, m

    def predict(self, p: dict) -> np.ndarray:
        cr, mr = self.row_multipliers(p)
        c = np.minimum(1.0, self.bc * cr[self.row])
        if p["matmul_half_dim"]:
            c = np.where(self.is_mm, c * self.md / (self.md + p["matmul_half_dim"]), c)
        m = np.minimum(1.0, self.bm * mr[self.row])
        div = np.array([1.0, p["attention_multiplier"], p["moe_multiplier"],
                        p["dequant_multiplier"]])[self.seg % len(GROUPS)]
        t = np.maximum(np.maximum(self.cs / c, self.ms / m) / div, self.fl) * self.wt
        s = np.bincount(self.seg, weights=t, minlength=self.n * 2 * len(GROUPS)).reshape(self.n, 2, len(GROUPS))
        s = s.sum(axis=2)
        per_pass = (p["host_overhead_us"] + p["collective_latency_us"] * self.coll) * 1e-6
        t = s + self.fixed + self.passes * per_pass[:, None]
        pre = t[:, 0] + p["prefill_overhead_us"] * 1e-6 * self.passes[:, 0]
        return _metric_vec(self.code, self.scale, self.steps, self.inp, self.out, pre, t[:, 1])

    def loss(self, p: dict) -> float:
        prior = sum(np.log(p[k]) ** 2 for k in PRIOR)
        for lv in LEVELS:
            w = LEVEL_PRIOR[lv]
            prior += w * sum(np.log(v) ** 2 for t in (p.get(f"{lv}_efficiency") or {}).values() for v in t.values())
        return float(np.sum(np.log(self.predict(p) / self.measured) ** 2) + prior)


# the fit's search space: multipliers on log grids (at most 2, a profile's limit), overheads on log grids with 0
_SEARCH = {"compute_multiplier": (0.02, 2.0), "memory_multiplier": (0.05, 2.0), "attention_multiplier": (0.05, 2.0),
           "moe_multiplier": (0.05, 2.0), "host_overhead_us": (0.0, 1e5), "prefill_overhead_us": (0.0, 1e5),
           "collective_latency_us": (0.0, 1e3), "matmul_half_dim": (0.0, 4096.0), "dequant_multiplier": (0.05, 2.0),
           "level": (0.05, 20.0)}
_OVERHEADS = ("host_overhead_us", "prefill_overhead_us", "collective_latency_us", "matmul_half_dim")


def _get(p: dict, k):
    return p[k] if isinstance(k, str) else p[f"{k[0]}_efficiency"][k[1]][k[2]]


def _set(p: dict, k, x: float) -> dict:
    if isinstance(k, str):
        return {**p, k: x}
    name = f"{k[0]}_efficiency"
    table = {**p[name], k[1]: {**p[name][k[1]], k[2]: x}}
    return {**p, name: table}


def fit_framework(rows: list[RowEval], framework: str) -> dict:
    """A framework's numbers from its rows among `rows`: compute and memory multipliers on the hardware's nominal
    efficiency, framework-wide and per hardware family and machine (LEVELS), an attention multiplier and the host
    overhead per step (a profile's fields), and where the rows can see them an extra overhead per prefill pass, a
    latency per collective (tensor-parallel rows), an MoE-expert multiplier (MoE rows), a multiplier on the
    matmuls that dequantise their weights (GROUPS) and a matmul half-efficiency dimension (tokens: small-batch
    matmuls cannot fill the machine). Minimises the sum of squared log errors (predicted/measured) plus a
    log-space prior pulling every multiplier towards 1 where the rows cannot tell. Coordinate descent: each number
    in turn on a grid around its value, the grid narrowing when a sweep no longer improves; each row's decode
    steps are sampled (FIT_STEP_SAMPLES) inside the objective. Returns the numbers and their provenance."""
    import datetime

    rows = [r for r in rows if r.framework == framework]
    if not rows:
        raise PerfmodelError(f"--framework: no expressible rows of {framework!r} to fit")
    data = _FitData(rows)
    free: list = ["compute_multiplier", "memory_multiplier", "host_overhead_us", "matmul_half_dim"]
    if any(r.e.metric in ("ttft_s", "prefill_tokens_per_s") for r in rows):
        free.append("prefill_overhead_us")  # only a prefill-only metric sees it apart from the step overhead
    if any(ph is not None and (ph.group == 1).any() for r in rows for ph in (r.pre, r.dec)):
        free.append("attention_multiplier")
    if any(r.e.model.is_moe for r in rows):
        free.append("moe_multiplier")
    if any((r.pre or r.dec).collectives for r in rows):
        free.append("collective_latency_us")
    if any(ph is not None and (ph.group == 3).any() for r in rows for ph in (r.pre, r.dec)):
        free.append("dequant_multiplier")
    p = dict(DEFAULT_PARAMS)
    for lv in LEVELS:  # a level is worth fitting only where the rows hold more than one of its keys
        keys = data.keys[lv] if len(data.keys[lv]) > 1 else []
        p[f"{lv}_efficiency"] = {k: {"compute": 1.0, "memory": 1.0} for k in keys}
        free += [(lv, k, x) for k in keys for x in ("compute", "memory")]
    best = data.loss(p)
    span = 4.0  # factor either side searched; shrinks as the fit settles
    for _ in range(60):
        improved = False
        for k in free:
            lo, hi = _SEARCH[k if isinstance(k, str) else "level"]
            v = _get(p, k)
            if k in _OVERHEADS:
                grid = np.clip(max(v, 1.0) * np.geomspace(1 / span, span, 9), 0, hi)
                cand = np.unique(np.concatenate([[0.0], grid]))
            else:
                cand = np.unique(np.clip(v * np.geomspace(1 / span, span, 9), lo, hi))
            for x in cand:
                q = _set(p, k, float(x))
                lq = data.loss(q)
                if lq < best - 1e-12:
                    best, p, improved = lq, q, True
        if not improved:
            if span < 1.02:
                break
            span = span ** 0.5
    fitted = {k: round(float(p[k]), 4) for k in DEFAULT_PARAMS}
    for lv in LEVELS:
        fitted[f"{lv}_efficiency"] = {k: {x: round(float(v), 4) for x, v in t.items()}
                                      for k, t in p[f"{lv}_efficiency"].items()}
    prof = rows[0].e.profile
    return {"framework": framework, **fitted,
            "provenance": {"sources": sorted({r.source for r in rows}), "n": len(rows),
                           "hardware": sorted({r.e.hw.name for r in rows}),
                           "metrics": sorted({r.e.metric for r in rows}),
                           "fitted": [k if isinstance(k, str) else ".".join(k) for k in free],
                           "exec": rows[0].e.exec_mode, "shipped_profile": prof.path if prof else None,
                           "date": datetime.date.today().isoformat(),
                           "objective": "sum of squared log errors (predicted/measured) + sum of squared log of "
                                        + ", ".join(PRIOR) + " and of every family and hardware multiplier",
                           "loss": round(best, 4)}}


def holdout_report(evals: list[RowEval], df: pd.DataFrame, frameworks: list[str] | None = None) -> dict:
    """Split by source, fit each framework on half 'fit', report the held-out half before and after the fit."""
    counts = pd.Series([r.source for r in evals]).value_counts().to_dict() if evals else {}
    half = split_by_source(df, counts)
    train = [r for r in evals if half[r.source] == 0]
    test = [r for r in evals if half[r.source] == 1]
    fws = frameworks or sorted({r.framework for r in evals})
    params = {fw: fit_framework(train, fw) for fw in fws if any(r.framework == fw for r in train)}
    return {"split": {s: ("fit" if h == 0 else "held-out") for s, h in sorted(half.items())},
            "fitted": params,
            "before_all": error_table(evals, "nominal"),
            "before_heldout": error_table(test, "nominal"),
            "after_heldout": error_table(test, "fitted", params),
            "after_fit_half": error_table(train, "fitted", params),
            "n_fit": len(train), "n_heldout": len(test)}


def fitted_profile(fitted: dict, report: dict, measurements: str) -> dict:
    """A framework profile (perfmodel.frameworks' schema) holding the fitted numbers: the shipped profile's
    exec mode, formats and block size, the multipliers under efficiency.default, the host overhead under
    host_overhead_us.default; the numbers a profile has no field for, the fit's data and the held-out errors go
    under provenance."""
    from perfmodel.frameworks import load_framework

    fw = fitted["framework"]
    try:
        base = load_framework(fw).to_dict()
    except PerfmodelError:
        base = {"name": fw, "description": fw, "exec": fitted["provenance"]["exec"]}
    a = fitted["attention_multiplier"]
    prof = {k: base[k] for k in ("name", "description", "version", "exec", "kv_block_tokens", "weight_formats",
                                 "kv_formats", "native_compute", "fp16_accumulate") if k in base}

    def entry(c: float, m: float) -> dict:  # a profile multiplier is at most 2 (it caps efficiency at 1 anyway)
        return {"compute": min(2.0, c), "memory": min(2.0, m), "kinds": {"attention": {"compute": a, "memory": a}}}

    c0, m0 = fitted["compute_multiplier"], fitted["memory_multiplier"]
    prof["efficiency"] = {"default": entry(c0, m0)}
    fams = fitted.get("family_efficiency") or {}
    for fam, t in fams.items():  # the most specific key wins, so each entry holds the product down to it
        prof["efficiency"][fam] = entry(c0 * t["compute"], m0 * t["memory"])
    for name, t in (fitted.get("hardware_efficiency") or {}).items():
        from perfmodel.frameworks import hardware_family

        f = fams.get(hardware_family(_library_hardware(name)), {})
        prof["efficiency"][name] = entry(c0 * f.get("compute", 1.0) * t["compute"],
                                         m0 * f.get("memory", 1.0) * t["memory"])
    prof["host_overhead_us"] = {"default": fitted["host_overhead_us"]}
    prof["provenance"] = {
        "efficiency": "fitted", "host_overhead_us": "fitted", "measurements": measurements,
        "fit": fitted["provenance"],
        "hold_out": "fitted on the half 'fit' of a split by source (no source in both halves); the errors below "
                    "are on the other half",
        "not_in_profile": {k: fitted[k] for k in EXTRA_PARAMS},
        "held_out_error_before_fit": [r for r in report["before_heldout"] if r["framework"] == fw],
        "held_out_error_after_fit": [r for r in report["after_heldout"] if r["framework"] == fw]}
    return _plain_floats(prof)


def write_profile(path: Path, fitted: dict, report: dict, measurements: str) -> Path:
    """The fitted profile as YAML (atomic write); `perfmodel ... --framework PATH` loads it."""
    import yaml

    from perfmodel.output import atomic_write

    doc = fitted_profile(fitted, report, measurements)
    return atomic_write(path, lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False)))


def _plain_floats(o):
    if isinstance(o, dict):
        return {k: _plain_floats(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain_floats(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return round(float(o), 4)
    if isinstance(o, np.integer):
        return int(o)
    return o


def roofline_check(df: pd.DataFrame) -> tuple[list[dict], int]:
    """Every row the cost model can express, against the pure datasheet roofline (efficiency 1, no launch or
    dispatch overheads, no communication, the largest batch memory can hold where the source prints none): a
    measured latency must not be shorter, a measured rate not higher. A row whose tokens/s may count input tokens
    is held to the total-tokens bound (the looser). Returns the rows that beat the bound and how many were
    checked."""
    beats, checked = [], 0
    for _, r in df.iterrows():
        if r["metric"] == "tokens_per_s":
            r = r.copy()
            r["metric"] = "total_tokens_per_s"
        e = express_row(r)
        if isinstance(e, str):
            continue
        ev = evaluate_row(e, r["framework"], r["source"])
        checked += 1
        latency = e.metric in LATENCY_METRICS
        if (e.measured < ev.roofline) if latency else (e.measured > ev.roofline):
            beats.append({"row": e.row, "framework": r["framework"], "hardware": e.hw.name, "model": e.model.name,
                          "metric": e.metric, "measured": e.measured, "roofline": ev.roofline,
                          "source": r["source"]})
    return beats, checked
