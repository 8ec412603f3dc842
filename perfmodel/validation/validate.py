"""`perfmodel validate`: run the reference engine over a grid and hold the cost model against it.

Counts (FLOPs, bytes, KV bytes per operator, phase and step) must be equal exactly; any difference is a failure
naming the operator. Times are compared as predicted vs measured:
- a phase (one forward pass) against its wall time measured without the tracer, the real cost;
- an operator against its traced time (eager cases; a compiled forward has no operators to time);
- the repeats of every point are interleaved with the other points' (round after round over the grid), so a
  burst of machine noise hits many points once rather than one point every time; the noise floor of a phase
  is the median relative spread ((max - min) / median) of its points' repeats, stated beside the error.
Overheads are named, measured terms: per-operator dispatch (calibrated per backend), the glue between
operators (wall time minus the sum of the operators' times) and the tracer's own cost (traced minus untraced
wall time), and each phase row says how much of the measured time each term explains.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from perfmodel.costmodel.operators import Precision, phase_ops
from perfmodel.costmodel.roofline import efficiency_group, op_timings, phase_summary
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.validation.counts import FIELDS, engine_totals, op_totals

# how the engine runs a case: (operator structure, launch mode of the cost model, compiled by torch.compile)
EXECS = {"eager": ("eager", "eager", None), "fused-eager": ("fused", "eager", None),
         "graph": ("eager", "graph", "graph"), "fused": ("fused", "fused", "fused")}


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
    exec: str = "eager"  # eager | fused-eager | graph | fused (EXECS)

    @property
    def label(self) -> str:
        depth = f"x{self.layers}L" if self.layers else ""
        ex = "" if self.exec == "eager" else f"/{self.exec}"
        name = self.model.rsplit("/", 1)[-1].removesuffix(".yaml")
        return (f"{name}{depth} {self.backend}/{self.dtype}{'/flash' if self.flash else ''}{ex} "
                f"b{self.batch}" + (f" p{self.prompt}" if self.prompt else ""))

    @property
    def structure(self) -> str:
        return EXECS[self.exec][0]

    @property
    def timing_mode(self) -> str:
        return EXECS[self.exec][1]

    @property
    def compiled(self) -> str | None:
        return EXECS[self.exec][2]

    @property
    def profile(self) -> str:
        """The hardware YAML's engines.<key> this case is predicted with: eager runs other than fp32 have their
        own profile where calibrated (a CPU without bf16 units converts every bf16 operand, so bf16 runs far
        from fp32's efficiencies); HardwareSpec.for_engine falls back to the backend's."""
        if self.compiled is not None:
            return f"{self.backend}:{self.compiled}"
        return self.backend if self.dtype == "fp32" else f"{self.backend}:{self.dtype}"

    def points(self) -> list[tuple[str, int, int]]:
        """(phase, new tokens, cached tokens) of every timed forward."""
        pre = [("prefill", self.prompt, 0)] if self.prompt else []
        return pre + [("decode", 1, c - 1) for c in self.decode_contexts]


def _smol(backend, dtype, batch, prompt, ctxs, flash=False, exec="eager"):
    return Case("smollm2-135m", None, backend, dtype, batch, prompt, tuple(ctxs), flash, exec)


GRIDS = {
    # seconds on a 2-core CPU; the CI test uses "tiny"
    "tiny": [Case("smollm2-135m", 2, "numpy", "fp32", 2, 16, (24,)),
             Case("gpt2", 1, "numpy", "fp32", 1, 8, (12,)),
             Case("smollm2-135m", 2, "numpy", "fp32", 1, 8, (12,), exec="fused-eager")],
    # deployment-like: full-depth models, real SmolLM2 weights, decode up to 4,096 tokens of context
    "default": [
        _smol("numpy", "fp32", 1, 16, (17, 129, 513, 1024, 2048, 4096)),
        _smol("numpy", "fp32", 1, 128, ()), _smol("numpy", "fp32", 1, 512, ()),
        _smol("numpy", "fp32", 4, 64, (65, 1024)), _smol("numpy", "fp32", 16, 32, (33, 512)),
        _smol("numpy", "fp32", 1, 128, (129, 1024, 4096), exec="fused-eager"),
        _smol("numpy", "fp32", 16, 0, (512,), exec="fused-eager"),
        _smol("torch", "fp32", 1, 2048, (513, 2048), flash=True), _smol("torch", "fp32", 4, 64, (), flash=True),
        _smol("torch", "fp32", 16, 0, (33,), flash=True),
        _smol("torch", "bf16", 1, 512, (513, 4096), flash=True), _smol("torch", "bf16", 4, 0, (1024,), flash=True),
        _smol("torch", "fp32", 1, 128, (513, 2048), flash=True, exec="graph"),
        _smol("torch", "fp32", 1, 128, (513, 2048), flash=True, exec="fused"),
        _smol("torch", "fp32", 4, 0, (1024,), flash=True, exec="fused"),
        Case("smollm2-360m", None, "numpy", "fp32", 1, 128, (129, 1024)),
        Case("gpt2", None, "numpy", "fp32", 1, 256, (257,)), Case("gpt2", None, "numpy", "fp32", 4, 0, (512,)),
    ],
}
GRIDS["numpy"] = [c for c in GRIDS["default"] if c.backend == "numpy"]


@dataclass
class CaseResult:
    case: Case
    op_rows: list[dict] = field(default_factory=list)
    phase_rows: list[dict] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def ape(rows: list[dict]) -> np.ndarray:
    m = np.array([r["measured_s"] for r in rows])
    p = np.array([r["predicted_s"] for r in rows])
    return np.abs(p - m) / m * 100


def spread(times: list[float]) -> float:
    """Relative spread of a point's repeats: (max - min) / median."""
    return (max(times) - min(times)) / statistics.median(times) if len(times) > 1 else 0.0


def error_summary(rows: list[dict], key: str) -> list[dict]:
    """Median, p90 and max absolute percentage error and signed bias, grouped by rows[key]; with the noise
    floor (median relative spread of the repeats) where the rows carry one."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    out = []
    for g, rs in sorted(groups.items()):
        rs = [r for r in rs if r["measured_s"] > 0]
        if not rs:
            continue
        e = ape(rs)
        signed = np.array([(r["predicted_s"] - r["measured_s"]) / r["measured_s"] * 100 for r in rs])
        row = {key: g, "n": len(rs), "median_ape_pct": float(np.median(e)), "p90_ape_pct": float(np.percentile(e, 90)),
               "max_ape_pct": float(e.max()), "bias_pct": float(np.median(signed))}
        if "noise_pct" in rs[0]:
            row["noise_pct"] = float(np.median([r["noise_pct"] for r in rs]))
        out.append(row)
    return out


class Runner:
    """Engines, caches and predictions for a list of cases; measures their points in interleaved rounds."""

    def __init__(self, cases: list[Case], hw: HardwareSpec, loaded: dict | None = None, seed: int = 0,
                 normalise: bool = True):
        from perfmodel.validation.reference import Reference

        self.cases, self.hw = cases, hw
        self.normalise = normalise
        self.reference = Reference()
        self.speed: dict = {}
        self.raw_walls: dict = {}
        self.loaded = {} if loaded is None else loaded
        self.engines: dict = {}
        self.rng = np.random.default_rng(seed)
        self.state: dict = {}  # case -> (engine, forward, cache, ids, tracer)

    def _weights(self, case: Case):
        from perfmodel.engine.loading import load_engine_model

        key = (case.model, case.layers)
        if key not in self.loaded:
            self.loaded[key] = load_engine_model(case.model, case.layers)
        return self.loaded[key]

    def _engine(self, case: Case):
        from perfmodel.engine.backend import make_backend
        from perfmodel.engine.tracer import Tracer
        from perfmodel.engine.transformer import Transformer

        key = (case.model, case.layers, case.backend, case.dtype, case.flash, case.structure)
        if key not in self.engines:
            spec, weights, _ = self._weights(case)
            tr = Tracer(enabled=False, timed=True)
            self.engines[key] = Transformer(spec, weights, make_backend(case.backend, case.dtype), flash=case.flash,
                                            tracer=tr, structure=case.structure)
        return self.engines[key]

    def setup(self, case: Case):
        if case in self.state:
            return self.state[case]
        from perfmodel.engine.transformer import KVCache

        engine = self._engine(case)
        spec = engine.spec
        max_ctx = max((case.prompt,) + case.decode_contexts)
        cache = KVCache(engine.be, spec, case.batch, max_ctx + 1)
        # decode timing does not depend on the cached values: fill the history with random K/V instead of
        # prefilling thousands of tokens first
        for t in cache.k + cache.v:
            t[...] = engine.be.asarray(self.rng.standard_normal(tuple(t.shape), dtype=np.float32) * 0.5)
        ids = self.rng.integers(1, spec.vocab_size, (case.batch, max(case.prompt, 1)))
        forward = engine.forward
        if case.compiled:
            from perfmodel.engine.compiled import compiled_forward

            forward = compiled_forward(engine, case.compiled)
        self.state[case] = (engine, forward, cache, ids)
        return self.state[case]

    def run(self, case: Case, point, traced: bool):
        """One forward of the point; returns (wall seconds, records or None)."""
        engine, forward, cache, ids = self.setup(case)
        phase, new, past = point
        tr = engine.tr
        tr.enabled = traced
        tr.clear()
        tr.phase = phase
        cache.length = past
        x = ids[:, :new]
        ctx = _inference_mode(case.backend)
        with ctx:
            t0 = time.perf_counter()
            forward(x, cache)
            engine.be.sync()
            wall = time.perf_counter() - t0
        tr.enabled = False
        return wall, (list(tr.records) if traced else None), list(tr.experts_touched)

    VISIT_S = 0.4  # seconds of timed calls per point and round, at most MAX_CALLS calls
    MAX_CALLS = 9

    @classmethod
    def _calls_per_visit(cls, seconds: float) -> int:
        return int(min(cls.MAX_CALLS, max(1, cls.VISIT_S // max(seconds, 1e-6))))

    def compute_share(self, case: Case, point) -> float:
        """The share of the point's predicted time that is compute-bound (the weight of the compute
        reference when it is rescaled; perfmodel.validation.reference.mixed_speed)."""
        spec = self._engine(case).spec
        phase, new, past = point
        precision = Precision(case.dtype, case.dtype, case.dtype)
        ops = phase_ops(spec, case.batch, new, past, precision, case.flash, include_sampling=False, phase=phase,
                        exec_mode=case.structure)
        summary = phase_summary(op_timings(ops, self.hw.for_engine(case.profile), precision, case.timing_mode))
        total = float(summary["time_s"])
        return float(summary["compute_bound_s"]) / total if total > 0 else 0.0

    def measure(self, repeats: int = 3, traced_repeats: int = 2, progress=None) -> list[CaseResult]:
        """Time every point, repeats interleaved across the points, each call right after the two reference
        calls (perfmodel.validation.reference: a decode step, a matmul); walls are rescaled to the machine's
        speed at calibration, the compute-bound share of a point by the compute reference."""
        from perfmodel.validation.reference import calibration_matmul_s, calibration_reference_s, mixed_speed

        points = [(c, p) for c in self.cases for p in c.points()]
        raw: dict = defaultdict(list)
        visits: dict = defaultdict(list)  # per visit: [(decode reference, matmul reference, wall)] per call
        walls: dict = defaultdict(list)
        traced_walls: dict = defaultdict(list)
        records: dict = defaultdict(list)
        touched: dict = {}
        calls, share = {}, {}
        for c, p in points:  # warm-up (and compilation) round
            self.run(c, p, traced=False)
            calls[(c, p)] = self._calls_per_visit(self.run(c, p, traced=False)[0])
            share[(c, p)] = self.compute_share(c, p) if self.normalise else 0.0
            if progress:
                progress(f"warm-up {c.label}")
        ref = self.reference
        for rnd in range(max(repeats, traced_repeats)):
            for c, p in points:
                if rnd < repeats:
                    # a cheap point is timed several times per visit (one call's time spreads +-12 % within
                    # seconds on a shared VM), each call right after its own reference calls, since the
                    # machine's speed moves within a visit too
                    n = calls[(c, p)]
                    visit = []
                    for _ in range(n):
                        rm = ref.seconds(c.backend, 1 if n >= 3 else 3) if self.normalise else 1.0
                        rc = ref.matmul_seconds(c.backend) if self.normalise else 1.0
                        visit.append((rm, rc, self.run(c, p, traced=False)[0]))
                    visits[(c, p)].append(visit)
                    raw[(c, p)].append(statistics.median(w for _, _, w in visit))
                if rnd < traced_repeats and c.compiled is None:
                    w, recs, tt = self.run(c, p, traced=True)
                    traced_walls[(c, p)].append(w)
                    records[(c, p)].append(recs)
                    touched[(c, p)] = tt
                if progress:
                    progress(f"round {rnd + 1}: {c.label}")
        self.speed = {}
        for backend in sorted({c.backend for c in self.cases}):
            keys = [k for k in raw if k[0].backend == backend]
            if not self.normalise:
                for k in keys:
                    walls[k] = list(raw[k])
                continue
            now_m = [statistics.median(r for r, _, _ in v) for k in keys for v in visits[k]]
            now_c = [statistics.median(r for _, r, _ in v) for k in keys for v in visits[k]]
            base_m = calibration_reference_s(self.hw, backend)
            base_c = calibration_matmul_s(self.hw, backend)
            if base_m is None:  # no calibrated reference: this run's own median speed
                base_m, base_c = statistics.median(now_m), statistics.median(now_c)
            for k in keys:
                walls[k] = [statistics.median(w / mixed_speed(rm / base_m, None if base_c is None else rc / base_c,
                                                                share[k]) for rm, rc, w in v) for v in visits[k]]
            # how many times slower than at calibration the machine ran, and how much that moved
            self.speed[backend] = {"factor": statistics.median(now_m) / base_m, "spread_pct": spread(now_m) * 100}
            if base_c is not None:
                self.speed[backend].update(compute_factor=statistics.median(now_c) / base_c,
                                           compute_spread_pct=spread(now_c) * 100)
        self.raw_walls = raw
        return [self._compare(c, walls, traced_walls, records, touched) for c in self.cases]

    def _compare(self, case, walls, traced_walls, records, touched) -> CaseResult:
        engine = self._engine(case)
        spec = engine.spec
        hw_e = self.hw.for_engine(case.profile)
        precision = Precision(case.dtype, case.dtype, case.dtype)
        res = CaseResult(case)
        for point in case.points():
            phase, new, past = point
            key = (case, point)
            moe = spec.moe_layers
            tt = touched.get(key) or []
            touched_mean = sum(tt[-moe:]) / moe if moe and tt else None
            ops = phase_ops(spec, case.batch, new, past, precision, case.flash, experts_touched=touched_mean,
                            include_sampling=False, phase=phase, exec_mode=case.structure)
            timings = op_timings(ops, hw_e, precision, case.timing_mode)
            by_name = {t.op.name: t for t in timings}
            pred_total = sum(float(t.time_s) * t.op.layers for t in timings)
            roof = sum(float(np.maximum(np.maximum(t.compute_s, t.memory_s), t.floor_s)) * t.op.layers
                       for t in timings if t.op.kind != "host")
            dispatch = sum(float(t.overhead_s) * t.op.layers for t in timings if t.op.kind != "host")
            host = sum(float(t.time_s) for t in timings if t.op.kind == "host")
            wall = statistics.median(walls[key])
            raw_wall = statistics.median(self.raw_walls.get(key) or walls[key])
            row = {"case": case.label, "model": case.model, "backend": case.backend, "dtype": case.dtype,
                   "exec": case.exec, "batch": case.batch, "phase": phase, "context": past + new, "new_tokens": new,
                   "measured_s": wall, "predicted_s": pred_total, "noise_pct": spread(walls[key]) * 100,
                   "measured_raw_s": raw_wall, "noise_raw_pct": spread(self.raw_walls.get(key) or walls[key]) * 100,
                   "pred_roofline_s": roof, "pred_dispatch_s": dispatch,
                   "pred_glue_s": host}
            if records.get(key):
                runs = records[key]
                per_op = _median_by_op(runs)
                ops_s = sum(per_op.values())
                # the operators are traced at the speed of their own moment: glue and tracer cost against
                # the untraced wall as timed, not rescaled
                row.update(measured_ops_s=ops_s, measured_glue_s=raw_wall - ops_s,
                           tracer_s=statistics.median(traced_walls[key]) - raw_wall)
                counts = next(iter(engine_totals(runs[-1]).values()))
                totals = op_totals(ops)
                for name, t in by_name.items():
                    if t.op.kind == "host":
                        continue
                    model_counts = totals[name]
                    for f in FIELDS:
                        if counts.get(name, {}).get(f, 0) != model_counts[f]:
                            res.mismatches.append(f"{case.label} {phase} past={past} {name}.{f}: engine "
                                                  f"{counts.get(name, {}).get(f, 0):,} != model {model_counts[f]:,}")
                    res.op_rows.append({
                        "case": case.label, "model": case.model, "backend": case.backend, "dtype": case.dtype,
                        "exec": case.exec, "batch": case.batch, "phase": phase, "context": past + new, "op": name,
                        "kind": t.op.kind, "flops": model_counts["flops"],
                        "bytes": sum(model_counts[f] for f in FIELDS[1:]), "bound": str(t.bound),
                        "layers": t.op.layers, "group": str(efficiency_group(t.op)), "variant": t.op.variant,
                        "measured_s": per_op.get(name, float("nan")),
                        "predicted_s": float(t.time_s) * t.op.layers,
                        "predicted_overhead_s": float(t.overhead_s) * t.op.layers})
                for name in set(per_op) - set(by_name):
                    res.mismatches.append(f"{case.label} {phase}: engine operator {name} has no model counterpart")
            res.phase_rows.append(row)
        return res


def _median_by_op(runs: list[list]) -> dict:
    """Per operator name: median over repeats of its time summed over layers."""
    per_run = []
    for recs in runs:
        t: dict = defaultdict(float)
        for r in recs:
            t[r.name] += r.time_s
        per_run.append(t)
    return {n: statistics.median(run[n] for run in per_run) for n in per_run[0]}


def _inference_mode(backend: str):
    import contextlib

    if backend == "torch":
        import torch

        return torch.inference_mode()
    return contextlib.nullcontext()


def run_case(case: Case, hw: HardwareSpec, repeats: int = 3, loaded: dict | None = None,
             progress=None) -> CaseResult:
    """One case on its own (its points interleaved with each other)."""
    return Runner([case], hw, loaded).measure(repeats, min(repeats, 2), progress=lambda *_: progress and progress())[0]
