"""Measured runs of any engine: read them, predict each, report the error, fit efficiency factors.

Formats: a CSV (model, hardware, batch, input, output and any of ttft_s/ttft_ms, tpot_s/tpot_ms, e2e_s,
tokens_per_s), the markdown table llama.cpp's llama-bench prints (pp<N> rows: prefill of N tokens; tg<N> rows:
decode), and the JSON that vLLM's benchmark scripts write (serving: mean_ttft_ms / mean_tpot_ms; latency:
avg_latency), for which --model, --hardware, --batch, --input, --output say what was run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.request import Workload, analyze
from pydantic import BaseModel

from perfmodel.errors import PerfmodelError, short
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
