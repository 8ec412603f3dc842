"""`perfmodel calibrate`: measure this machine and write a hardware YAML the cost model can use.

What is measured, and how it enters the model (a few interpretable numbers, no black box):
- matmul FLOP/s per dtype over square and skinny shapes -> peak_tflops (the best achieved) and
  matmul_half_dim h, the smallest-dimension scale at which a matmul reaches half its peak: eff = d / (d + h);
- the all-threads read bandwidth over a sweep from 256 kB to 1 GB (perfmodel.engine.membw) -> one level per
  cache (memory.levels: L2, L3 with their capacity from /sys) and main memory's bandwidth; an elementwise add's
  bandwidth -> the elementwise_memory fraction;
- per backend and dtype, a matmul's time at 2-16 rows over the fastest row count, weights streaming from DRAM
  -> skinny_rows (a BLAS runs rows in register tiles; the cost model streams a skinny matmul's weights that
  many times slower);
- the engine's own softmax on cache-resident data -> vector_tflops (elementwise FLOP rate);
- each engine backend's operators on tiny tensors, in both operator structures -> op_overhead_map_us, the
  dispatch cost of each operator; the same forwards without the tracer -> the glue between operators
  (step_overhead_us + layer_overhead_us per layer) and the tracer's own cost (provenance);
- the compiled forwards (torch.compile: graph and fused) of tiny models -> their per-step and per-layer
  launch cost (engines["torch:graph"], engines["torch:fused"]);
- per operator kind, a compute and a memory efficiency multiplier fitted on the engine's own operators over
  calibration cases at full depth (weights streaming from DRAM, as in deployments) whose widths, batches and
  contexts the validation grid does not use;
- ragged serving steps of the calibration model, one step's 32 tokens split over 1-32 sequences -> the
  per-sequence, per-layer host cost of the ragged attention loop (ragged_sequence_us; ragged_calibration.py);
- the two speed references validate and serve-bench rescale to: a decode step of the calibration model and a
  512^3 matmul (provenance.reference_step_ms, reference_matmul_ms; reference.py);
- cache sizes from /sys, memory capacity from /proc/meminfo.
On an NVIDIA GPU, pynvml names the device, the matching datasheet YAML is the roof, and the matmul and
bandwidth measurements run on the GPU through PyTorch.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np

from perfmodel.validation.ragged_calibration import ragged_sequence_cost

SQUARE = (64, 128, 256, 512, 1024, 1536)
SKINNY_M = (1, 4, 16, 64, 256)
SKINNY_KN = 1024


def _best_time(fn, repeats=5, min_time=0.02) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def matmul_points(backend, dtype: str, progress=None, square=SQUARE, skinny=SKINNY_M) -> list[dict]:
    """Achieved FLOP/s for square n^3 and skinny [m, K] x [K, N] matmuls."""
    from perfmodel.engine.backend import make_backend

    be = make_backend(backend, dtype)
    rng = np.random.default_rng(0)
    shapes = [(n, n, n) for n in square] + [(m, SKINNY_KN, SKINNY_KN) for m in skinny]
    out = []
    for m, k, n in shapes:
        a, b = be.asarray(rng.random((m, k), dtype=np.float32)), be.asarray(rng.random((k, n), dtype=np.float32))
        t = _best_time(lambda: be.matmul(a, b), repeats=3)
        nbytes = be.nbytes(a) + be.nbytes(b) + m * n * be.nbytes(a) // max(m * k, 1)
        out.append({"backend": backend, "dtype": dtype, "m": m, "k": k, "n": n, "time_s": t,
                    "flops": 2 * m * k * n, "bytes": nbytes, "tflops": 2 * m * k * n / t / 1e12})
        if progress:
            progress()
    return out


def fit_half_dim(points: list[dict], peak: float, bandwidth: float) -> float:
    """h minimising the squared log error of t = max(flops / (peak * d/(d+h)), bytes / bw) over the points."""
    best_h, best_err = 0.0, float("inf")
    for h in np.concatenate([[0.0], np.geomspace(1, 4096, 200)]):
        err = 0.0
        for p in points:
            d = min(p["m"], p["k"], p["n"])
            pred = max(p["flops"] / (peak * d / (d + h)), p["bytes"] / bandwidth)
            err += np.log(pred / p["time_s"]) ** 2
        if err < best_err:
            best_h, best_err = float(h), err
    return best_h


# the calibration model's projections and LM head (a BLAS picks its kernel by shape too; the median over them)
SKINNY_SHAPES = ((640, 640), (640, 1792), (1792, 640), (640, 32000))


def skinny_row_profile(backend: str, dtype: str = "fp32", stream_bytes: float = 256e6, repeats: int = 5,
                       shapes=SKINNY_SHAPES) -> dict[int, float]:
    """Per row count m = 2..16 (the skinny group): the time of [m, K] x [K, N] over the fastest of those row
    counts on the same weights (>= 1), the median over `shapes` (how much faster a one-row gemv is depends on
    the weight's shape and layout; the pattern over m does not, so the level is left to the fitted memory
    efficiency). The weights rotate through stream_bytes of copies (several times the last-level cache) so
    that they stream from DRAM as in a decode step; row counts are interleaved within a repeat and each
    keeps its best repeat."""
    from perfmodel.engine.backend import make_backend

    be = make_backend(backend, dtype)
    rng = np.random.default_rng(0)
    rows = range(2, 17)
    ratios: dict[int, list] = {m: [] for m in rows}
    for k, n in shapes:
        copies = max(4, int(stream_bytes / (k * n * 4)))
        ws = [be.asarray(rng.random((k, n), dtype=np.float32)) for _ in range(copies)]
        if backend == "numpy" and k > n:  # laid out as the engine holds a tall weight (Transformer.__init__)
            ws = [np.ascontiguousarray(w.T).T for w in ws]
        xs = {m: be.asarray(rng.random((m, k), dtype=np.float32)) for m in rows}
        best = {m: float("inf") for m in rows}
        for _ in range(repeats):
            for m in rows:
                x = xs[m]
                t0 = time.perf_counter()
                for w in ws:
                    be.matmul(x, w)
                be.sync()
                best[m] = min(best[m], (time.perf_counter() - t0) / copies)
        fastest = min(best.values())
        for m in rows:
            ratios[m].append(best[m] / fastest)
        del ws
    return {m: round(float(statistics.median(r)), 3) for m, r in ratios.items()}


def vector_tflops(backend: str) -> float:
    """FLOP rate of the engine's own masked softmax on cache-resident scores (5 FLOPs per kept score)."""
    from perfmodel.engine.backend import make_backend

    be = make_backend(backend, "fp32")
    s = be.asarray(np.random.default_rng(0).random((64, 512), dtype=np.float32))
    mask = np.ones((64, 512), dtype=bool)
    mask_b = mask if backend == "numpy" else be.torch.as_tensor(mask)
    t = _best_time(lambda: be.masked_softmax(s, mask_b))
    return 5 * s.shape[0] * s.shape[1] / t / 1e12


def _tiny_specs():
    from perfmodel.specs.model import ModelSpec

    tiny = dict(hidden_size=16, num_heads=2, intermediate_size=16, vocab_size=32, max_position=64)
    return [ModelSpec(name="tiny", family="llama", num_kv_heads=1, num_layers=4, **tiny),
            ModelSpec(name="tiny-gpt2", family="gpt2", num_kv_heads=2, num_layers=4, **tiny),
            ModelSpec(name="tiny-moe", family="mixtral", num_kv_heads=1, num_experts=4, experts_per_token=2,
                      num_layers=4, **tiny)]


def dispatch_overheads(backend: str, dtype: str = "fp32") -> tuple[dict, dict, dict]:
    """Median time of each engine operator on tiny tensors (tiny models of every engine family, both operator
    structures, with and without FlashAttention on torch): the fixed cost of one call, per operator name and
    per operator kind. Also the host terms of a forward: glue (untraced wall minus the traced operators' sum,
    fitted as per step + per layer over two depths) and the tracer's own cost per recorded operator."""
    from perfmodel.costmodel.operators import Precision, op_variant, phase_ops
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.tracer import Tracer
    from perfmodel.engine.transformer import KVCache, Transformer
    from perfmodel.engine.weights import random_weights

    by_name: dict = {}
    by_kind: dict = {}
    glue_rows, tracer_per_op = [], []
    flashes = (False, True) if backend == "torch" else (False,)
    for spec in _tiny_specs():
        for structure in ("eager", "fused"):
            for flash in flashes:
                for layers in (2, 8):
                    sp = spec.replace(num_layers=layers)
                    # per kernel call: an operator of several calls (blocked attention) is divided by them
                    calls = {o.name: float(np.asarray(o.calls)) for o in phase_ops(
                        sp, 1, 1, 10, Precision(dtype, dtype, dtype), flash, include_sampling=False,
                        exec_mode=structure)}
                    tr = Tracer(enabled=True)
                    m = Transformer(sp, random_weights(sp), make_backend(backend, dtype), flash=flash, tracer=tr,
                                    structure=structure)
                    ids = np.ones((1, 1), dtype=np.int64)
                    walls, traced, sums, n_ops = [], [], [], 0
                    for _ in range(3):
                        cache = KVCache(m.be, sp, 1, 40)
                        for _ in range(30):
                            tr.enabled = False
                            t0 = time.perf_counter()
                            m.forward(ids, cache)
                            walls.append(time.perf_counter() - t0)
                            cache.length -= 1
                            tr.enabled = True
                            n0 = len(tr.records)
                            t0 = time.perf_counter()
                            m.forward(ids, cache)
                            traced.append(time.perf_counter() - t0)
                            new = tr.records[n0:]
                            sums.append(sum(r.time_s for r in new))
                            n_ops = len(new)
                            if layers == 8:
                                for r in new:
                                    t = r.time_s / calls.get(r.name, 1.0)
                                    by_name.setdefault(r.name, []).append(t)
                                    by_kind.setdefault(r.kind, []).append(t)
                                    variant = op_variant(sp, r.name)
                                    if variant:
                                        by_name.setdefault(f"{r.name}:{variant}", []).append(t)
                        tr.clear()
                    wall, ops = statistics.median(walls), statistics.median(sums)
                    glue_rows.append((layers, wall - ops))
                    tracer_per_op.append((statistics.median(traced) - wall) / max(n_ops, 1))
    med = lambda v: round(statistics.median(v) * 1e6, 2)  # noqa: E731
    # glue = step + layers * layer, least squares over the two depths of every variant
    L = np.array([r[0] for r in glue_rows], dtype=float)
    g = np.array([r[1] for r in glue_rows]) * 1e6
    A = np.stack([np.ones_like(L), L], axis=1)
    step, per_layer = np.linalg.lstsq(A, g, rcond=None)[0]
    host = {"step_overhead_us": round(max(float(step), 0.0), 2), "layer_overhead_us": round(max(float(per_layer), 0.0), 2),
            "tracer_us_per_op": round(statistics.median(tracer_per_op) * 1e6, 2)}
    return ({k: med(v) for k, v in sorted(by_name.items())}, {k: med(v) for k, v in sorted(by_kind.items())}, host)


def compiled_overheads(progress=None) -> dict:
    """Per-step and per-layer host cost of the engine's compiled forwards (torch.compile graph / fused) on a
    tiny dense model at two depths, where the operators' own work is negligible."""
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.compiled import compiled_forward
    from perfmodel.engine.transformer import KVCache, Transformer
    from perfmodel.engine.weights import random_weights

    import torch

    out = {}
    spec = _tiny_specs()[0]
    for mode, structure in (("graph", "eager"), ("fused", "fused")):
        walls = {}
        for layers in (2, 6):
            sp = spec.replace(num_layers=layers)
            m = Transformer(sp, random_weights(sp), make_backend("torch"), flash=True, structure=structure)
            fwd = compiled_forward(m, mode)
            cache = KVCache(m.be, sp, 1, 60)
            ids = np.ones((1, 1), dtype=np.int64)
            ts = []
            with torch.inference_mode():
                for i in range(50):
                    cache.length = 20 + i % 10
                    t0 = time.perf_counter()
                    fwd(ids, cache)
                    ts.append(time.perf_counter() - t0)
            walls[layers] = statistics.median(ts[10:])
            if progress:
                progress(f"torch {mode} compiled overheads ({layers} layers)")
        per_layer = (walls[6] - walls[2]) / 4
        out[mode] = {"layer_overhead_us": round(max(per_layer, 0.0) * 1e6, 2),
                     "step_overhead_us": round(max(walls[2] - 2 * per_layer, 0.0) * 1e6, 2)}
    return out


CALIBRATION_MODEL = str(Path(__file__).with_name("calib-llama-640.yaml"))


def _calibration_cases(backend: str, dtype: str = "fp32"):
    """Full-depth cases whose weights stream from DRAM, at widths (640, 1024, 2048), batches (2, 3, 6, 8, 12)
    and contexts the validation grid does not use; random weights."""
    from perfmodel.validation.validate import Case

    flash = backend == "torch"
    c = CALIBRATION_MODEL
    return [Case(c, None, backend, dtype, 1, 40, (300, 1500, 2500), flash),
            Case(c, None, backend, dtype, 3, 96, (700,), flash),
            Case(c, None, backend, dtype, 8, 0, (200,), flash),
            # 12 decode rows: the top of the skinny group (up to 16 rows), which batches 2-8 left extrapolated
            Case(c, None, backend, dtype, 12, 0, (400,), flash),
            Case(c, None, backend, dtype, 6, 0, (600,), flash, exec="fused-eager"),
            Case(c, None, backend, dtype, 1, 200, (900, 3000), flash, exec="fused-eager"),
            Case("gpt2-medium", 8, backend, dtype, 2, 96, (97, 700), flash),
            Case("gpt2-medium", 8, backend, dtype, 1, 0, (161, 1000), flash),
            Case("smollm2-1.7b", 2, backend, dtype, 3, 40, (41, 1500), flash),
            Case("smollm2-1.7b", 2, backend, dtype, 1, 0, (700,), flash, exec="fused-eager")]


def engine_profile(backend: str, hw_dict: dict, dtype: str = "fp32", progress=None, loaded: dict | None = None,
                   engine: str | None = None) -> dict:
    """Fit per operator kind a compute and a memory efficiency multiplier (and, for matmuls, the transfer size
    at which streaming reaches half speed) from the engine's own operators on the calibration cases, with the
    cache-aware roofline and the measured per-call overheads (which are not fitted)."""
    import dataclasses

    from perfmodel.costmodel.operators import Precision, phase_ops
    from perfmodel.costmodel.roofline import op_timings
    from perfmodel.specs.hardware import hardware_from_dict
    from perfmodel.validation.validate import Runner

    hw = hardware_from_dict(hw_dict, "calibration").for_engine(engine or backend)
    neutral = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, kind_compute={}, kind_memory={},
                                                                     kind_overhead_scale={}, matmul_half_bytes=0.0))
    cases = _calibration_cases(backend, dtype)
    runner = Runner(cases, neutral, loaded)
    results = runner.measure(repeats=2, traced_repeats=2, progress=lambda s: progress and progress(
        f"{engine or backend} calibration cases: {s}"))
    prec = Precision(dtype, dtype, dtype)
    rows = []
    for res in results:
        case = res.case
        spec = runner._engine(case).spec
        for r in res.op_rows:
            if r["measured_s"] > 0:
                rows.append(r)
        # the components of each row's prediction at unit multipliers, for the grid fit below
        for point in case.points():
            phase, new, past = point
            ops = phase_ops(spec, case.batch, new, past, prec, case.flash, include_sampling=False, phase=phase,
                            exec_mode=case.structure)
            for t in op_timings(ops, neutral, prec, case.timing_mode, host=False):
                for r in res.op_rows:
                    if r["op"] == t.op.name and r["phase"] == phase and r["context"] == past + new:
                        r.update(c1=float(t.compute_s) * t.op.layers, m1=float(t.memory_s) * t.op.layers,
                                 o1=float(t.overhead_s) * t.op.layers, b1=float(np.asarray(t.op.bytes)))
    fitted: dict = {"kind_compute": {}, "kind_memory": {}, "kind_overhead_scale": {}}
    grid = np.geomspace(0.05, 3.0, 48)
    scales = np.geomspace(0.25, 16.0, 19)
    halves = np.concatenate([[0.0], np.geomspace(1e4, 1e8, 17)])
    data, fits = {}, {}
    for group in sorted({r["group"] for r in rows}):
        rs = [r for r in rows if r["group"] == group and "c1" in r]
        if not rs:
            continue
        meas = np.array([r["measured_s"] for r in rs])
        c1, m1, o1 = (np.array([r[k] for r in rs]) for k in ("c1", "m1", "o1"))
        nbytes = np.array([r["b1"] for r in rs])
        data[group] = (rs, meas, c1, m1, o1, nbytes)
        c = c1[None, :] / grid[:, None]  # [compute grid, rows]
        if group == "skinny" and hw.efficiency.skinny_rows:  # a measured row table: the stream alone (roofline)
            c = np.zeros_like(c)
        fits[group] = {}
        for half in (halves if group in MATMUL_GROUPS else [0.0]):
            m = m1[None, :] * (1 + half / nbytes[None, :]) / grid[:, None]  # [memory grid, rows]
            roof = np.maximum(c[:, None, :], m[None, :, :])  # [cg, mg, rows]
            best = (np.inf, 0, 0, 0)
            for k, sc in enumerate(scales):
                err = (np.log((roof + sc * o1) / meas) ** 2).sum(axis=-1)
                i, j = np.unravel_index(np.argmin(err), err.shape)
                if err[i, j] < best[0]:
                    best = (err[i, j], i, j, k)
            fits[group][float(half)] = best
    # the cost model applies one half-speed size to every matmul, so the row groups share it: the one that
    # fits them best together (a size fitted per group and then maxed would misprice the groups it was not
    # fitted on)
    mm = [g for g in fits if g in MATMUL_GROUPS]
    shared_half = min(halves, key=lambda h: sum(fits[g][float(h)][0] for g in mm)) if mm else 0.0
    if shared_half:
        fitted["matmul_half_bytes"] = round(float(shared_half), 0)
    for group, (rs, meas, c1, m1, o1, nbytes) in data.items():
        half = float(shared_half) if group in MATMUL_GROUPS else 0.0
        _, bi, bj, bk = fits[group][half]
        fitted["kind_compute"][group] = round(float(grid[bi]), 4)
        if group == "skinny" and hw.efficiency.skinny_rows:
            fitted["kind_compute"][group] = 1.0  # not used: the row table's stream is the whole law
        fitted["kind_memory"][group] = round(float(grid[bj]), 4)
        fitted["kind_overhead_scale"][group] = round(float(scales[bk]), 3)
        # per-call cost differs between operators of one group (a norm is several numpy calls, a residual add
        # one; a fused gate_up matmul carries its activation epilogue): refine the scale per operator (and
        # variant), a weight matmul's within its row group
        tabled = group == "skinny" and hw.efficiency.skinny_rows
        roof = np.maximum(0.0 if tabled else c1 / grid[bi], m1 * (1 + half / nbytes) / grid[bj])
        keys = np.array([f"{r['op']}:{r['variant']}" if r.get("variant") else r["op"] for r in rs])
        if group in MATMUL_GROUPS:
            keys = np.array([f"{group}.{k}" for k in keys])
        for key in sorted(set(keys)):
            sel = keys == key
            err = [(np.log((roof[sel] + sc * o1[sel]) / meas[sel]) ** 2).sum() for sc in scales]
            fitted["kind_overhead_scale"][str(key)] = round(float(scales[int(np.argmin(err))]), 3)
    return _phase_correction(fitted, neutral, runner, results, prec)


MATMUL_GROUPS = ("matmul", "skinny", "gemv")


def compiled_correction(d: dict, loaded: dict, progress=None) -> None:
    """Scale the compiled modes' roofline terms by one factor each, fitted on a full-depth calibration model's
    untraced compiled forwards. The compiled graph does not run the eager kernels (its matmuls, the functional
    KV-cache update), and the tiny model that measures its per-step and per-layer host cost cannot show that
    part, which grows with the model."""
    from perfmodel.costmodel.operators import Precision
    from perfmodel.specs.hardware import hardware_from_dict
    from perfmodel.validation.validate import Case, Runner

    hw = hardware_from_dict(d, "calibration")
    prec = Precision("fp32", "fp32", "fp32")
    for mode in ("graph", "fused"):
        key = f"torch:{mode}"
        if key not in d["engines"]:
            continue
        case = Case(CALIBRATION_MODEL, None, "torch", "fp32", 1, 40, (300, 1500), True, exec=mode)
        runner = Runner([case], hw, loaded)
        res = runner.measure(repeats=3, traced_repeats=0, progress=lambda s: progress and progress(
            f"{key} calibration case: {s}"))[0]
        spec, hw_e = runner._engine(case).spec, hw.for_engine(case.profile)
        terms = []
        for row in res.phase_rows:
            point = (row["phase"], row["new_tokens"], row["context"] - row["new_tokens"])
            terms.append((*phase_terms(spec, case, point, hw_e, prec), row["measured_s"]))
        roof, disp, host, wall = (np.array(col) for col in zip(*terms))
        a = np.geomspace(0.5, 3.0, 121)[:, None]
        err = (np.log((a * roof + disp + host) / wall) ** 2).sum(axis=-1)
        a = float(a[int(np.argmin(err)), 0])
        eff = d["engines"][key]["efficiency"]
        for table in ("kind_compute", "kind_memory"):
            eff[table] = {k: round(v / a, 4) for k, v in eff[table].items()}
        d["provenance"].setdefault("phase_correction", {})[key] = {"roofline": round(a, 3)}


def phase_terms(spec, case, point, hw, precision, experts_touched=None,
                split_attention: bool = False) -> tuple[float, ...]:
    """A forward pass's predicted (roofline, per-operator dispatch, host glue) seconds, as validate sums them;
    with split_attention, (roofline of all but attention, attention's roofline, dispatch, host glue)."""
    from perfmodel.costmodel.operators import phase_ops
    from perfmodel.costmodel.roofline import op_timings

    phase, new, past = point
    ops = phase_ops(spec, case.batch, new, past, precision, case.flash, experts_touched=experts_touched,
                    include_sampling=False, phase=phase, exec_mode=case.structure)
    timings = op_timings(ops, hw, precision, case.timing_mode)
    roofs = [float(np.maximum(np.maximum(t.compute_s, t.memory_s), t.floor_s)) * t.op.layers
             for t in timings if t.op.kind != "host"]
    kinds = [t.op.kind for t in timings if t.op.kind != "host"]
    roof = sum(roofs)
    dispatch = sum(float(t.overhead_s) * t.op.layers for t in timings if t.op.kind != "host")
    host = sum(float(t.time_s) for t in timings if t.op.kind == "host")
    if split_attention:
        attn = sum(r for r, k in zip(roofs, kinds) if k == "attention")
        return roof - attn, attn, dispatch, host
    return roof, dispatch, host


def _phase_correction(fitted: dict, neutral, runner, results, precision) -> dict:
    """Rescale the fitted roofline and dispatch terms by one factor each so that the calibration cases' whole
    forward passes, timed without the tracer, are predicted best. The per-operator fit sees traced operator
    times, which carry part of the tracer's own cost and miss the cache effects between operators; the untraced
    wall time is what validate (and a user) compares against."""
    import dataclasses

    hw = dataclasses.replace(neutral, efficiency=dataclasses.replace(
        neutral.efficiency, kind_compute=fitted["kind_compute"], kind_memory=fitted["kind_memory"],
        kind_overhead_scale=fitted["kind_overhead_scale"], matmul_half_bytes=fitted.get("matmul_half_bytes", 0.0)))
    terms = []
    for res in results:
        spec = runner._engine(res.case).spec
        for row in res.phase_rows:
            point = (row["phase"], row["new_tokens"], row["context"] - row["new_tokens"])
            terms.append((*phase_terms(spec, res.case, point, hw, precision, split_attention=True),
                          row["measured_s"]))
    if not terms:
        return fitted
    rest, attn, disp, host, wall = (np.array(col) for col in zip(*terms))
    # attention's roofline gets its own factor: the per-operator fit sees each attention call traced on its
    # own, while in an untraced forward the KV it reads follows the projections that just wrote it; the
    # calibration cases' decode contexts (200-3000 tokens) fix the slope of the wall over context
    a = np.geomspace(0.5, 2.0, 61)[:, None, None, None]
    b = np.geomspace(0.25, 4.0, 41)[None, :, None, None]
    o = np.geomspace(0.05, 4.0, 81)[None, None, :, None]
    err = (np.log((a * rest + b * attn + o * disp + host) / wall) ** 2).sum(axis=-1)
    i, j, k = np.unravel_index(np.argmin(err), err.shape)
    a, b, o = float(a[i, 0, 0, 0]), float(b[0, j, 0, 0]), float(o[0, 0, k, 0])
    kinds = sorted(set(fitted["kind_compute"]) | {"matmul", "skinny", "gemv", "attention", "elementwise", "memory"})
    for kind in kinds:
        f = b if kind == "attention" else a
        fitted["kind_compute"][kind] = round(fitted["kind_compute"].get(kind, 1.0) / f, 4)
        fitted["kind_memory"][kind] = round(fitted["kind_memory"].get(kind, 1.0) / f, 4)
        fitted["kind_overhead_scale"].setdefault(kind, 1.0)
    fitted["kind_overhead_scale"] = {k: round(v * o, 3) for k, v in fitted["kind_overhead_scale"].items()}
    fitted["phase_correction"] = {"roofline": round(a, 3), "attention_roofline": round(b, 3), "dispatch": round(o, 3)}
    return fitted


def cache_capacities() -> dict[str, int]:
    """Bytes of each cache level for all cores together (private levels times the core count)."""
    sizes = cache_sizes()
    cores = os.cpu_count() or 1
    out = {}
    for name in ("L2", "L3"):
        mb = _mb(sizes.get(name))
        if mb:
            out[name] = int(mb * 2**20 * (cores if name == "L2" else 1))
    return out


def cache_sizes() -> dict:
    out = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level, kind, size = ((idx / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind in ("Data", "Unified"):
            out[f"L{level}"] = size
    return out


def memory_capacity_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    return 16.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_gpu() -> dict | None:
    """Name, memory and bandwidth of GPU 0 through pynvml, or None when there is no NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001  no driver, no GPU: a CPU-only machine
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        # DDR-style signalling: two transfers per clock
        bw = 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9
        return {"name": name, "memory_gb": round(mem / 1e9, 1), "memory_clock_mhz": clock_mhz,
                "bus_width_bits": bus_bits, "bandwidth_gbps_from_clocks": round(bw, 1)}
    finally:
        pynvml.nvmlShutdown()


def match_datasheet(gpu_name: str) -> str | None:
    """The library YAML for a pynvml device name, e.g. 'NVIDIA H100 80GB HBM3' -> h100-sxm."""
    n = gpu_name.lower()
    table = [("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100-sxm"), ("b200", "b200"),
             ("a100-sxm4-40gb", "a100-40gb"), ("a100 40gb", "a100-40gb"), ("a100", "a100-80gb"), ("l40s", "l40s"),
             ("l4", "l4"), ("4090", "rtx-4090"), ("3090", "rtx-3090")]
    for key, name in table:
        if key in n:
            return name
    return None


def calibrate(out_dir: Path, name: str | None = None, backends=("numpy", "torch"), progress=None,
              quick: bool = False, fit_engine: bool = True) -> tuple[Path, dict]:
    """Measure, fit, and write hardware/local-<name>.yaml atomically. Returns (path, the YAML dict)."""
    import yaml

    from perfmodel.output import _plain, atomic_write

    square, skinny = ((64, 256, 512), (1, 16, 256)) if quick else (SQUARE, SKINNY_M)
    have_torch = "torch" in backends
    if have_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            backends = tuple(b for b in backends if b != "torch")
    gpu = nvidia_gpu()
    step = progress or (lambda *a: None)
    from perfmodel.engine.membw import bandwidths, levels_from_sweep, read_sweep

    step("bandwidth sweep (256 kB .. 1 GB, all threads)")
    sweep = read_sweep()
    levels, dram_gbps = levels_from_sweep(sweep, cache_capacities())
    bw = bandwidths()
    bw["read_gbps"] = dram_gbps
    engines: dict = {}
    skinny_tables: dict = {}  # (backend, dtype) -> the measured skinny-row table
    tracer_cost: dict = {}
    all_points = []
    for backend in backends:
        dtypes = ["fp32"] + (["bf16"] if backend == "torch" else [])
        peaks = {}
        for dt in dtypes:
            pts = matmul_points(backend, dt, lambda: step(f"{backend} {dt} matmul"), square, skinny)
            all_points += pts
            peaks[dt] = max(p["tflops"] for p in pts)
        half = fit_half_dim([p for p in all_points if p["backend"] == backend and p["dtype"] == "fp32"],
                            peaks["fp32"] * 1e12, bw["read_gbps"] * 1e9)
        vec = vector_tflops(backend)
        step(f"{backend} vector")
        step(f"{backend} dispatch and glue")
        per_op, per_kind, host_terms = dispatch_overheads(backend)
        step(f"{backend} skinny matmul rows 2-16")
        for dt in dtypes:
            skinny_tables[(backend, dt)] = skinny_row_profile(
                backend, dt, **({"stream_bytes": 64e6, "repeats": 2} if quick else {}))
        engines[backend] = {"peak_tflops": {k: round(v, 5) for k, v in peaks.items()},
                            "vector_tflops": round(vec, 6),
                            "efficiency": {"matmul_half_dim": round(half, 1),
                                           "skinny_rows": skinny_tables[(backend, "fp32")],
                                           "kind_overhead_us": per_kind,
                                           "op_overhead_map_us": per_op,
                                           "step_overhead_us": host_terms["step_overhead_us"],
                                           "layer_overhead_us": host_terms["layer_overhead_us"]}}
        tracer_cost[backend] = host_terms["tracer_us_per_op"]
    host = name or socket.gethostname().split(".")[0].lower() or "machine"
    best = {}
    for prof in engines.values():
        for k, v in prof["peak_tflops"].items():
            best[k] = max(best.get(k, 0.0), v)
    first = engines[backends[0]]
    d = {
        "name": f"local-{host}", "description": f"{cpu_model()}, {os.cpu_count()} threads (measured)",
        "kind": "cpu", "peak_tflops": best, "vector_tflops": first["vector_tflops"],
        "memory": {"capacity_gb": memory_capacity_gb(), "bandwidth_gbps": round(bw["read_gbps"], 2),
                   "type": "host DRAM", "levels": levels},
        "onchip_cache_mb": _mb(cache_sizes().get("L3")), "interconnect": None, "launch_overhead_us": 0.0,
        "efficiency": {"compute": 1.0, "memory": 1.0, "matmul_half_dim": first["efficiency"]["matmul_half_dim"],
                       "elementwise_memory": round(min(1.0, bw["elementwise_gbps"] / bw["read_gbps"]), 3),
                       "kind_overhead_us": first["efficiency"]["kind_overhead_us"],
                       "op_overhead_map_us": first["efficiency"]["op_overhead_map_us"],
                       "optimistic": {"compute": 1.0, "memory": 1.0},
                       "pessimistic": {"compute": 0.7, "memory": 0.75}},
        "engines": engines, "power_w": None, "price_per_hour_usd": None,
        "sources": {"datasheet": "measured by perfmodel calibrate", "efficiency": "measured"},
        "provenance": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
                       "threads": os.cpu_count(), "numpy": np.__version__, "torch": _torch_version(),
                       "python": platform.python_version(), "caches": cache_sizes(),
                       "elementwise_gbps": round(bw["elementwise_gbps"], 2), "gpu": gpu,
                       "read_sweep_gbps": {f"{p['bytes'] // 1024} kB": round(p["gbps"], 1) for p in sweep},
                       "read_sweep_how": f"{sweep[0]['how']}, {sweep[0]['threads']} threads",
                       "tracer_us_per_op": tracer_cost,
                       "matmul_points": [{k: (round(v, 9) if isinstance(v, float) else v) for k, v in p.items()}
                                         for p in all_points]},
    }
    if gpu:
        d = _gpu_yaml(d, gpu, progress=step)
    else:
        if "torch" in backends:
            for mode, terms in compiled_overheads(progress=step).items():
                base = d["engines"]["torch"]
                d["engines"][f"torch:{mode}"] = {"peak_tflops": dict(base["peak_tflops"]),
                                                 "vector_tflops": base["vector_tflops"],
                                                 "efficiency": {**base["efficiency"], **terms}}
        if fit_engine:
            from perfmodel.validation.reference import Reference

            # the speed every later measurement is rescaled to (validate, serve-bench; reference.py)
            ref = Reference()
            d["provenance"]["reference_step_ms"] = {b: round(ref.seconds(b, calls=15) * 1e3, 3) for b in backends}
            d["provenance"]["reference_matmul_ms"] = {b: round(ref.matmul_seconds(b, calls=15) * 1e3, 4)
                                                      for b in backends}
            loaded: dict = {}
            for backend in backends:
                fitted = engine_profile(backend, d, progress=step, loaded=loaded)
                d["provenance"].setdefault("phase_correction", {})[backend] = fitted.pop("phase_correction", None)
                for key, prof in d["engines"].items():
                    if key.split(":")[0] == backend:
                        prof["efficiency"].update(fitted)
            if "torch" in backends:
                compiled_correction(d, loaded, progress=step)
                # bf16 gets its own fit: on a CPU without bf16 units every operand is converted, so none of
                # fp32's multipliers carry over (validate predicts bf16 runs with engines["torch:bf16"])
                base = d["engines"]["torch"]
                d["engines"]["torch:bf16"] = {"peak_tflops": dict(base["peak_tflops"]),
                                              "vector_tflops": base["vector_tflops"],
                                              "efficiency": {**base["efficiency"],
                                                             "skinny_rows": skinny_tables[("torch", "bf16")]}}
                fitted = engine_profile("torch", d, dtype="bf16", progress=step, loaded=loaded,
                                        engine="torch:bf16")
                d["provenance"]["phase_correction"]["torch:bf16"] = fitted.pop("phase_correction", None)
                d["engines"]["torch:bf16"]["efficiency"].update(fitted)
            for backend in backends:
                # after the fits: the per-sequence cost is what their roofline leaves of a ragged step
                ragged = ragged_sequence_cost(backend, d, progress=step)
                d["provenance"].setdefault("ragged_splits_ms", {})[backend] = ragged["splits_ms"]
                for key, prof in d["engines"].items():
                    if key.split(":")[0] == backend:
                        prof["efficiency"]["ragged_sequence_us"] = ragged["ragged_sequence_us"]
            d["efficiency"].update(d["engines"][backends[0]]["efficiency"])
    path = out_dir / f"{d['name']}.yaml"
    atomic_write(path, lambda p: p.write_text("# Written by `perfmodel calibrate`; re-run it to refresh.\n"
                                              + yaml.safe_dump(_plain(d), sort_keys=False, width=120)))
    return path, d


def _gpu_yaml(d: dict, gpu: dict, progress) -> dict:
    """On an NVIDIA GPU: the datasheet YAML is the roof; efficiencies come from torch measurements on the GPU."""
    import torch

    from perfmodel.specs.hardware import load_hardware

    ref = match_datasheet(gpu["name"])
    sheet = load_hardware(ref) if ref else None
    dev = torch.device("cuda")
    peaks = {}
    for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (1024, 2048, 4096, 8192):
            a, b = torch.randn(n, n, device=dev, dtype=tdt), torch.randn(n, n, device=dev, dtype=tdt)
            torch.cuda.synchronize()
            t = _best_time(lambda: (a @ b, torch.cuda.synchronize()), repeats=3)
            best = max(best, 2 * n ** 3 / t / 1e12)
        peaks[dt] = best
        progress(f"gpu {dt} matmul")
    x = torch.empty(2 ** 28, device=dev, dtype=torch.float32)
    t = _best_time(lambda: (x.sum(), torch.cuda.synchronize()), repeats=3)
    bw = x.numel() * 4 / t / 1e9
    progress("gpu bandwidth")
    d["kind"] = "gpu"
    d["description"] = f"{gpu['name']} (measured; roof: {ref or 'no datasheet match'})"
    if sheet:
        d["peak_tflops"] = dict(sheet.peak_tflops)
        d["vector_tflops"] = sheet.vector_tflops
        d["memory"] = {"capacity_gb": gpu["memory_gb"], "bandwidth_gbps": sheet.memory_bandwidth_gbps,
                       "type": sheet.memory_type}
        d["efficiency"]["compute"] = round(min(1.0, peaks["bf16"] / sheet.peak_tflops.get("bf16", peaks["bf16"])), 3)
        d["efficiency"]["memory"] = round(min(1.0, bw / sheet.memory_bandwidth_gbps), 3)
    else:
        d["peak_tflops"] = {k: round(v, 2) for k, v in peaks.items()}
        d["memory"] = {"capacity_gb": gpu["memory_gb"], "bandwidth_gbps": round(bw, 1), "type": "GPU"}
    d["provenance"]["gpu_measured"] = {"tflops": {k: round(v, 2) for k, v in peaks.items()},
                                       "read_gbps": round(bw, 1)}
    return d


def _mb(size: str | None) -> float | None:
    if not size:
        return None
    size = size.upper()
    mult = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1], 1 / 2**20)
    return float(size.rstrip("KMG")) * mult


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:
        return None
