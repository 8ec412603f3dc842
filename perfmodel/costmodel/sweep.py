"""Vectorised request-level sweep: one numpy evaluation per (model, hardware) over the whole grid.

A decode step's FLOPs and bytes are affine in the context length (piecewise, with breaks where a sliding
window fills and at each chunk boundary of chunked attention), so each operator's time is max(affine, affine) +
overhead and its sum over all decode steps has a closed form: the sweep is exact, not sampled, and costs
O(operators) per grid point whatever the output length.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from perfmodel.costmodel.execution import DEFAULT_EXEC
from perfmodel.costmodel.operators import Precision, kv_cache_bytes, phase_ops, weight_memory_bytes
from perfmodel.costmodel.parallel import Parallelism, per_device_ops, per_device_weights
from perfmodel.costmodel.roofline import op_timings, phase_summary
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec


BATCH_BLOCK = 2048  # distinct batches whose pieces are found together (bounds the [op, piece] temporaries)


def _pieces(c0, c1, m0, m1, f, over, layers, lo, hi):
    """Integer pieces of [lo, hi] (hi may be inf) on which every operator keeps its bound, for every batch
    (column) at once, as (batch index, starts, a, b): on [start, next start) the step time is a + b*past.
    An operator's time is max(compute line, memory line, floor) + overhead; the winner can change only where
    two of the three lines cross. Inputs are [op, batch] (layers [op, 1])."""
    out = []
    for j0 in range(0, c0.shape[1], BATCH_BLOCK):
        cols = slice(j0, j0 + BATCH_BLOCK)
        lines = [(c0[:, cols], c1[:, cols]), (m0[:, cols], m1[:, cols]), (f[:, cols], np.zeros_like(f[:, cols]))]
        splits = []
        for i in range(3):
            for k in range(i + 1, 3):
                (a0, a1), (b0, b1) = lines[i], lines[k]
                e = a1 - b1
                with np.errstate(divide="ignore", invalid="ignore"):
                    cross = (b0 - a0) / e
                    # first integer past at which the winner changes (only where the lines cross inside)
                    split = np.where(e > 0, np.ceil(cross), np.floor(cross) + 1)
                valid = (e != 0) & np.isfinite(split) & (split > lo) & (split <= hi)
                splits.append(np.where(valid, split, np.inf))
        cand = np.sort(np.concatenate([np.full((1, lines[0][0].shape[1]), float(lo)), *splits]), axis=0)
        keep = np.isfinite(cand)
        keep[1:] &= cand[1:] != cand[:-1]
        jj, row = np.nonzero(keep.T)  # batch-major, starts ascending within each batch
        starts = cand[row, jj]
        # probe each piece at its start: the winner is constant across the piece
        vals = np.stack([a0[:, jj] + a1[:, jj] * starts for a0, a1 in lines])  # [line, op, piece]
        win = np.argmax(vals, axis=0)
        intercept = np.choose(win, [a0[:, jj] for a0, _ in lines])
        slope = np.choose(win, [a1[:, jj] for _, a1 in lines])
        a = (layers * (intercept + over[:, cols][:, jj])).sum(axis=0)
        b = (layers * slope).sum(axis=0)
        out.append((jj + j0, starts, a, b))
    return tuple(np.concatenate(x) for x in zip(*out))


def _decode_coefficients(model, hw, p, flash, batch_u, at, exec_mode, par=None):
    """Per operator (rows) and distinct batch (columns): compute and memory seconds as affine functions of
    past tokens, read off at past = at and at + 1 (exact: the costs are affine on each segment)."""
    par = par or Parallelism()

    def ops_at(past):
        ops = phase_ops(model, batch_u, 1, past, p, flash, phase="decode", exec_mode=exec_mode)
        return op_timings(per_device_ops(ops, model, par, hw, batch_u, p), hw, p, exec_mode)

    t0, t1 = ops_at(at), ops_at(at + 1)
    shape = (len(batch_u),)
    stack = lambda ts, f: np.stack([np.broadcast_to(getattr(t, f), shape) for t in ts])  # noqa: E731
    c0, m0 = stack(t0, "compute_s"), stack(t0, "memory_s")
    c1, m1 = stack(t1, "compute_s") - c0, stack(t1, "memory_s") - m0
    over = stack(t0, "overhead_s")  # per batch: a blocked kernel dispatches per sequence
    floor = np.array([t.floor_s for t in t0])[:, None] * np.ones(shape)
    layers = np.array([t.op.layers for t in t0], dtype=np.float64)[:, None]
    return c0 - c1 * at, c1, m0 - m1 * at, m1, floor, over, layers


def decode_segments(model: ModelSpec, max_past: float) -> list[tuple[float, float]]:
    """Ranges of past tokens on which a decode step's costs are affine: broken where a sliding window fills
    (past = W) and at every chunk boundary of chunked layers (past = k*C) up to max_past."""
    breaks = {0}
    for t in model.layer_type_counts():
        window, chunk = model.attention_span(t)
        if window:
            breaks.add(window)
        if chunk:
            breaks.update(range(chunk, int(max_past) + chunk, chunk))
    starts = sorted(breaks)
    return [(lo, hi - 1) for lo, hi in zip(starts, starts[1:])] + [(starts[-1], np.inf)]


def _decode_totals(model, hw, p, flash, batch, inp, out, exec_mode, par=None):
    """Total decode seconds over the steps with past = inp .. inp+out-2, and the first and last step times.

    Per distinct batch the step time is piecewise linear in past, so its prefix sum F(x) = sum_{y<=x} step(y)
    is piecewise quadratic; each grid point is then two lookups: F(inp+out-2) - F(inp-1).
    """
    inv, batch_u = pd.factorize(batch, sort=True)  # hashing: O(n), unlike np.unique's sort
    segments = decode_segments(model, float(np.max(inp + out)) if len(inp) else 0.0)
    coeffs = [_decode_coefficients(model, hw, p, flash, batch_u, lo, exec_mode, par) for lo, _ in segments]
    found = [_pieces(*cf[:6], cf[6][:, :1], lo, hi) for cf, (lo, hi) in zip(coeffs, segments)]
    jj, starts, a_all, b_all = (np.concatenate(x) for x in zip(*found))
    order = np.lexsort((starts, jj))  # by batch, then past
    jj, starts, a_all, b_all = jj[order], starts[order], a_all[order], b_all[order]
    # F before each piece: the sum of the batch's earlier pieces (each runs to the next start - 1)
    last = np.append(jj[1:] != jj[:-1], True)  # a batch's last piece runs to infinity: never summed
    ends = np.where(last, starts, np.append(starts[1:], 0) - 1)
    piece_sum = np.where(last, 0.0, _affine_sum(starts, ends, a_all, b_all))
    before = np.cumsum(piece_sum) - piece_sum
    first = np.flatnonzero(np.append(True, jj[1:] != jj[:-1]))
    f_start = before - before[first][np.cumsum(np.append(True, jj[1:] != jj[:-1])) - 1]
    span = 2.0 ** 40  # key = batch index * span + past, exact in float64
    keys = jj * span + starts
    starts_all = starts

    def prefix(x):  # F(x) = sum of step times for past in [0, x]; F(-1) = 0
        xc = np.maximum(x, 0)
        k = np.searchsorted(keys, inv * span + xc, side="right") - 1
        return np.where(x < 0, 0.0, f_start[k] + _affine_sum(starts_all[k], xc, a_all[k], b_all[k])), k

    x_first, x_last = inp, inp + out - 2
    f_hi, k_last = prefix(x_last)
    f_lo, _ = prefix(x_first - 1)
    _, k_first = prefix(x_first)
    step = lambda k, x: a_all[k] + b_all[k] * x  # noqa: E731
    return f_hi - f_lo, step(k_first, x_first), step(k_last, x_last)


def _affine_sum(x0, x1, a, b):
    """Sum of a + b*x over integers x0..x1 (zero when x1 < x0)."""
    n = np.maximum(x1 - x0 + 1, 0)
    return n * a + b * (x0 + x1) * n / 2


def sweep_arrays(model: ModelSpec, hw: HardwareSpec, batch, inp, out, precision: Precision | None = None,
                 flash: bool = True, exec_mode: str = DEFAULT_EXEC,
                 parallelism: Parallelism | None = None) -> dict[str, np.ndarray]:
    """Request-level figures for aligned 1-D arrays batch, inp, out (one entry per grid point); with
    parallelism, per device on the critical path (as analyze)."""
    p = precision or Precision()
    par = parallelism or Parallelism()
    batch, inp, out = (np.asarray(x, dtype=np.float64) for x in (batch, inp, out))
    # prefill depends on (batch, input) only: evaluate each distinct pair once
    pair_inv, pair_keys = pd.factorize(batch * 2.0 ** 32 + inp)
    pairs = np.stack([np.floor(pair_keys / 2.0 ** 32), pair_keys % 2.0 ** 32])
    pre_ops = phase_ops(model, pairs[0], pairs[1], 0, p, flash, phase="prefill", exec_mode=exec_mode)
    pre = phase_summary(op_timings(per_device_ops(pre_ops, model, par, hw, pairs[0] * pairs[1], p), hw, p, exec_mode))
    host = hw.host_overhead_us * 1e-6  # the serving loop's time per step outside the forward (Analysis.request)
    ttft = np.broadcast_to(pre["time_s"], pairs[0].shape)[pair_inv] + host
    prefill_bound = np.broadcast_to(pre["bound"], pairs[0].shape)[pair_inv]
    decode_s, tpot_first, tpot_last = _decode_totals(model, hw, p, flash, batch, inp, out, exec_mode, par)
    decode_s, tpot_first, tpot_last = decode_s + host * np.maximum(out - 1, 0), tpot_first + host, tpot_last + host
    e2e = ttft + decode_s
    weights = per_device_weights(model, par, p, weight_memory_bytes(model, p))
    kv = kv_cache_bytes(model, inp + out, batch, p.kv_cache) / (par.tp * par.pp)
    total = weights + kv
    has_decode = out > 1
    return {
        "ttft_s": ttft, "tpot_s": np.where(has_decode, decode_s / np.maximum(out - 1, 1), 0.0),
        "tpot_first_s": np.where(has_decode, tpot_first, 0.0), "tpot_last_s": np.where(has_decode, tpot_last, 0.0),
        "e2e_s": e2e, "tokens_per_s": batch * out / e2e,
        "prefill_bound": prefill_bound,
        "weights_bytes": np.full(batch.shape, float(weights)), "kv_cache_bytes": kv, "memory_bytes": total,
        "fits": total <= hw.memory_capacity,
    }


CHUNK_POINTS = 1 << 17  # grid points evaluated together: ~100 MB of temporaries whatever the grid's size


def grid_points(n_models: int, n_hardware: int, tps, batches, inputs, outputs) -> int:
    """Rows of the Cartesian grid, computed without building it."""
    return n_models * n_hardware * len(tps) * len(batches) * len(inputs) * len(outputs)


def iter_sweep(models: list[ModelSpec], hardware: list[HardwareSpec], batches, inputs, outputs,
               precision: Precision | None = None, flash: bool = True, exec_mode: str = DEFAULT_EXEC,
               tps=(1,), chunk: int = CHUNK_POINTS) -> Iterator[pd.DataFrame]:
    """The grid models x hardware x tp x batch x input x output as DataFrames of at most `chunk` rows, in
    row order (output fastest). Each chunk's points are decoded from their flat index, so memory is bounded
    by the chunk and the axes, never by the grid."""
    batches, inputs, outputs = (np.asarray(x).reshape(-1) for x in (batches, inputs, outputs))
    n_out, n_io = len(outputs), len(inputs) * len(outputs)
    n = len(batches) * n_io
    for m in models:
        for hw in hardware:
            for tp in tps:
                for start in range(0, n, chunk):
                    idx = np.arange(start, min(start + chunk, n), dtype=np.int64)
                    b, i, o = batches[idx // n_io], inputs[(idx // n_out) % len(inputs)], outputs[idx % n_out]
                    cols = sweep_arrays(m, hw, b, i, o, precision, flash, exec_mode=exec_mode,
                                        parallelism=Parallelism(tp=tp))
                    yield pd.DataFrame({"model": m.name, "hardware": hw.name, "tp": tp, "batch": b, "input": i,
                                        "output": o, **cols})


def sweep(models: list[ModelSpec], hardware: list[HardwareSpec], batches, inputs, outputs,
          precision: Precision | None = None, flash: bool = True, progress=None,
          exec_mode: str = DEFAULT_EXEC, tps=(1,)) -> pd.DataFrame:
    """Cartesian grid models x hardware x tp x batch x input x output, as one DataFrame (one row per point);
    iter_sweep streams the same rows in bounded memory."""
    frames = []
    for df in iter_sweep(models, hardware, batches, inputs, outputs, precision, flash, exec_mode, tps):
        frames.append(df)
        if progress:
            progress(len(df))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
