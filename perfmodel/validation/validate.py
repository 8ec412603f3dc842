"""`perfmodel validate`: run the reference engine over a grid and hold the cost model against it.

Counts (FLOPs, bytes, KV bytes per operator, phase and step) must be equal exactly; any difference is a failure
naming the operator. Times are compared as predicted vs measured (median of repeats after a warm-up), per
operator and per phase, with the absolute percentage error's median, p90 and max.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from perfmodel.costmodel.operators import Precision, phase_ops
from perfmodel.costmodel.roofline import op_timings
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.validation.counts import FIELDS, engine_totals, op_totals


@dataclass(frozen=True)
class Case:
    model: str  # smollm2-135m: real weights; other library names: random weights
    layers: int | None
    backend: str
    dtype: str
    batch: int
    prompt: int
    decode_contexts: tuple[int, ...] = ()
    flash: bool = False

    @property
    def label(self) -> str:
        depth = f"x{self.layers}L" if self.layers else ""
        return (f"{self.model}{depth} {self.backend}/{self.dtype}{'/flash' if self.flash else ''} "
                f"b{self.batch} p{self.prompt}")


GRIDS = {
    # seconds on a 2-core CPU; the CI test uses "tiny"
    "tiny": [Case("smollm2-135m", 2, "numpy", "fp32", 2, 16, (24,)),
             Case("gpt2", 1, "numpy", "fp32", 1, 8, (12,))],
    "quick": [Case("smollm2-135m", None, "numpy", "fp32", b, p, (p + 1, 1024)) for b, p in
              ((1, 16), (1, 128), (1, 512), (4, 64), (16, 32))]
    + [Case("smollm2-360m", 4, "numpy", "fp32", 2, 256, (257, 2048)),
       Case("gpt2-medium", 4, "numpy", "fp32", 4, 128, (129,)),
       Case("smollm2-1.7b", 2, "numpy", "fp32", 1, 1024, (1025,))],
}
GRIDS["standard"] = GRIDS["quick"] + [
    Case("smollm2-135m", None, "numpy", "fp32", 1, 2048, (2049,)),
    Case("smollm2-135m", None, "numpy", "fp32", 8, 256, (257,)),
    Case("smollm2-135m", None, "torch", "fp32", 1, 512, (513, 1024), flash=True),
    Case("smollm2-135m", None, "torch", "bf16", 4, 128, (129,), flash=True),
    Case("smollm2-135m", None, "torch", "fp32", 2, 256, (257,)),
    Case("llama-3.1-8b", 1, "numpy", "fp32", 1, 128, (129,)),
    Case("mixtral-8x7b", 1, "torch", "bf16", 2, 64, (65,), flash=True),
]


@dataclass
class CaseResult:
    case: Case
    op_rows: list[dict] = field(default_factory=list)
    phase_rows: list[dict] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _median_by_op(runs: list[list]) -> dict:
    """Per operator name: median over repeats of its time summed over layers; plus one run's counts."""
    per_run = []
    for recs in runs:
        t: dict = defaultdict(float)
        for r in recs:
            t[r.name] += r.time_s
        per_run.append(t)
    names = per_run[0].keys()
    return {n: statistics.median(run[n] for run in per_run) for n in names}


def run_case(case: Case, hw: HardwareSpec, repeats: int = 3, loaded: dict | None = None,
             progress=None) -> CaseResult:
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.tracer import Tracer
    from perfmodel.engine.transformer import KVCache, Transformer

    key = (case.model, case.layers)
    loaded = {} if loaded is None else loaded
    if key not in loaded:
        loaded[key] = load_engine_model(case.model, case.layers)
    spec, weights, _ = loaded[key]
    be = make_backend(case.backend, case.dtype)
    tr = Tracer(enabled=True, timed=True)
    engine = Transformer(spec, weights, be, flash=case.flash, tracer=tr)
    hw_e = hw.for_engine(case.backend)
    precision = Precision(case.dtype, case.dtype, case.dtype)
    rng = np.random.default_rng(0)
    max_ctx = max((case.prompt,) + case.decode_contexts)
    ids = rng.integers(1, spec.vocab_size, (case.batch, max_ctx))
    cache = KVCache(be, spec, case.batch, max_ctx + 1)
    res = CaseResult(case)

    def measure(phase, new, past):
        """Repeat one forward of `new` tokens after `past` cached ones; return per-op medians and wall time."""
        runs, walls = [], []
        if past:
            tr.enabled = False
            cache.length = 0
            engine.forward(ids[:, :past], cache)
            tr.enabled = True
        for rep in range(repeats + 1):  # the first is a warm-up
            tr.clear()
            cache.length = past
            tr.phase = phase
            t0 = time.perf_counter()
            engine.forward(ids[:, past:past + new], cache)
            wall = time.perf_counter() - t0
            if rep:
                runs.append(list(tr.records))
                walls.append(wall)
        touched = list(tr.experts_touched)
        # one forward: every record shares the tracer's phase and step
        counts = next(iter(engine_totals(runs[-1]).values()))
        return _median_by_op(runs), statistics.median(walls), counts, touched

    import contextlib

    ctx = contextlib.nullcontext()
    if case.backend == "torch":
        ctx = be.torch.inference_mode()
    with ctx:
        points = [("prefill", case.prompt, 0)] + [("decode", 1, c - 1) for c in case.decode_contexts]
        for phase, new, past in points:
            med, wall, counts, touched = measure(phase, new, past)
            moe = spec.moe_layers
            touched_mean = sum(touched[-moe:]) / moe if moe and touched else None
            ops = phase_ops(spec, case.batch, new, past, precision, case.flash, experts_touched=touched_mean,
                            include_sampling=False, phase=phase)
            timings = {t.op.name: t for t in op_timings(ops, hw_e, precision, host=False)}
            totals = op_totals(ops)
            for name, t in timings.items():
                model_counts = totals[name]
                for f in FIELDS:
                    if counts[name][f] != model_counts[f]:
                        res.mismatches.append(f"{case.label} {phase} past={past} {name}.{f}: engine "
                                              f"{counts[name][f]:,} != model {model_counts[f]:,}")
                pred = float(t.time_s) * t.op.layers
                shape_eff = 1.0
                if t.op.kind in ("matmul", "attention") and hw_e.efficiency.matmul_half_dim and t.op.min_dim is not None:
                    dmin = float(np.asarray(t.op.min_dim))
                    shape_eff = dmin / (dmin + hw_e.efficiency.matmul_half_dim)
                res.op_rows.append({
                    "case": case.label, "model": case.model, "backend": case.backend, "dtype": case.dtype,
                    "batch": case.batch, "phase": phase, "context": past + new, "op": name, "kind": t.op.kind,
                    "flops": model_counts["flops"], "bytes": sum(model_counts[f] for f in FIELDS[1:]),
                    "bound": str(t.bound), "layers": t.op.layers, "shape_eff": shape_eff,
                    "measured_s": med.get(name, float("nan")), "predicted_s": pred})
            missing = set(med) - set(timings)
            for name in missing:
                res.mismatches.append(f"{case.label} {phase}: engine operator {name} has no model counterpart")
            pred_total = sum(float(t.time_s) * t.op.layers for t in timings.values())
            res.phase_rows.append({"case": case.label, "model": case.model, "backend": case.backend,
                                   "dtype": case.dtype, "batch": case.batch, "phase": phase,
                                   "context": past + new, "new_tokens": new, "measured_s": wall,
                                   "predicted_s": pred_total})
            if progress:
                progress()
    return res


def ape(rows: list[dict]) -> np.ndarray:
    m = np.array([r["measured_s"] for r in rows])
    p = np.array([r["predicted_s"] for r in rows])
    return np.abs(p - m) / m * 100


def error_summary(rows: list[dict], key: str) -> list[dict]:
    """Median, p90 and max absolute percentage error, grouped by rows[key]."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    out = []
    for g, rs in sorted(groups.items()):
        e = ape(rs)
        out.append({key: g, "n": len(rs), "median_ape_pct": float(np.median(e)),
                    "p90_ape_pct": float(np.percentile(e, 90)), "max_ape_pct": float(e.max())})
    return out
