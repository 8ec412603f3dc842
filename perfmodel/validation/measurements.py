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
from perfmodel.errors import PerfmodelError
from perfmodel.specs import load_hardware, load_model
from perfmodel.specs.hardware import HardwareSpec

METRICS = ("ttft_s", "tpot_s", "e2e_s", "tokens_per_s")


def read_measurements(path: Path, defaults: dict) -> pd.DataFrame:
    if not path.is_file():
        raise PerfmodelError(f"--measurements: {path} not found")
    text = path.read_text()
    if path.suffix == ".json":
        return _vllm_json(json.loads(text), defaults, path)
    if "|" in text.splitlines()[0] and "t/s" in text:
        return _llama_bench(text, defaults)
    df = pd.read_csv(path)
    for ms in ("ttft", "tpot", "e2e"):
        if f"{ms}_ms" in df and f"{ms}_s" not in df:
            df[f"{ms}_s"] = df[f"{ms}_ms"] / 1e3
    for col in ("model", "hardware", "batch", "input", "output"):
        if col not in df:
            if defaults.get(col) is None:
                raise PerfmodelError(f"{path}: column {col!r} missing (or pass --{col})")
            df[col] = defaults[col]
    if not any(m in df for m in METRICS):
        raise PerfmodelError(f"{path}: no measured column; allowed: {', '.join(METRICS)} (or *_ms)")
    return df


def _llama_bench(text: str, d: dict) -> pd.DataFrame:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        test, tps = cells.get("test", ""), float(cells["t/s"].split("±")[0])
        m = re.match(r"(pp|tg)(\d+)", test)
        if not m:
            continue
        n = int(m.group(2))
        row = {"model": d.get("model"), "hardware": d.get("hardware"), "batch": d.get("batch") or 1}
        if m.group(1) == "pp":
            row.update(input=n, output=1, ttft_s=n / tps)
        else:
            row.update(input=d.get("input") or 1, output=n + 1, tpot_s=1 / tps)
        rows.append(row)
    if not rows or rows[0]["model"] is None or rows[0]["hardware"] is None:
        raise PerfmodelError("llama-bench table: pass --model and --hardware (the table names a file, not a spec)")
    return pd.DataFrame(rows)


def _vllm_json(d: dict, defaults: dict, path: Path) -> pd.DataFrame:
    need = [k for k in ("model", "hardware", "batch", "input", "output") if defaults.get(k) is None]
    if need:
        raise PerfmodelError(f"{path}: vLLM results do not say the workload; pass --{need[0]}")
    row = {k: defaults[k] for k in ("model", "hardware", "batch", "input", "output")}
    if "mean_ttft_ms" in d:
        row.update(ttft_s=d["mean_ttft_ms"] / 1e3, tpot_s=d.get("mean_tpot_ms", math.nan) / 1e3)
    elif "avg_latency" in d:
        row.update(e2e_s=d["avg_latency"])
    else:
        raise PerfmodelError(f"{path}: no mean_ttft_ms or avg_latency; not a vLLM benchmark result")
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
