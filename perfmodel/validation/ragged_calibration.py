"""The per-sequence host cost of a ragged serving step, measured on the calibration model.

A serving step (`Transformer.forward_ragged`) runs the weight matmuls once over all the step's tokens but
attention once per sequence: per layer and sequence it writes the new K/V into the paged cache, gathers the
sequence's slots and calls attention on one sequence. Those are several small calls whose host cost the
operator calibration never sees (it measures the batched attention operator, one call over the batch, whose
dispatch is larger). Priced with the batched operator's dispatch, a step of 16 decoding sequences of
SmolLM2-135M was over-predicted by 25-46 % on the development VM.

The measurement keeps the step's tokens fixed (32) and splits them over k = 1..32 sequences: the body (matmuls, norms) is
the same for every k, so the measured time's growth with k, less the predicted growth of attention's roofline
time and of the head (one row per sequence), is k times the per-sequence cost of every layer.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

# per step, split over SPLITS sequences, each after PAST cached tokens: few tokens, so that the body (the
# same at every split) is small beside what grows with the split, up to one token per sequence (a decode step)
TOKENS = 32
SPLITS = (1, 4, 16, 32)
PAST = 48
BLOCK = 16


def _compositions() -> dict[int, list[tuple[int, int]]]:
    out = {}
    for k in SPLITS:
        sizes = [TOKENS // k + (1 if i < TOKENS % k else 0) for i in range(k)]
        out[k] = [(n, PAST) for n in sizes]
    return out


def measure_splits(engine, repeats: int = 7) -> dict[int, float]:
    """Median forward seconds per split, repeats interleaved across the splits (a drifting VM then shifts
    every split alike rather than one)."""
    from perfmodel.serving.runner import PagedKV

    spec = engine.spec
    comps = _compositions()
    blocks_needed = max(sum(-(-(n + p) // BLOCK) for n, p in c) for c in comps.values())
    kv = PagedKV(engine.be, spec, blocks_needed, BLOCK)
    rng = np.random.default_rng(0)
    inputs = {}
    for k, comp in comps.items():
        seqs, nxt = [], 0
        for n, p in comp:
            nb = -(-(n + p) // BLOCK)
            seqs.append((p, n, kv.slots(list(range(nxt, nxt + nb)), p + n)))
            nxt += nb
        inputs[k] = (rng.integers(0, spec.vocab_size, TOKENS), seqs)
    times: dict[int, list[float]] = {k: [] for k in comps}
    for k, (ids, seqs) in inputs.items():  # warm-up
        engine.forward_ragged(ids, seqs, kv)
    for _ in range(repeats):
        for k, (ids, seqs) in inputs.items():
            t0 = time.perf_counter()
            engine.forward_ragged(ids, seqs, kv)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def fit_sequence_cost(spec, hw, measured: dict[int, float], precision, flash: bool) -> float:
    """Per-sequence, per-layer host cost (µs) of the ragged attention loop: the least-squares slope of the
    measured step time over k, after the predicted roofline-and-head part of each split is taken out."""
    from perfmodel.costmodel.ragged import ragged_step_seconds

    zero = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, ragged_sequence_us=0.0))
    comps = _compositions()
    ks = np.array(sorted(measured), dtype=np.float64)
    resid = np.array([measured[int(k)] - ragged_step_seconds(spec, zero, comps[int(k)], precision, flash)
                      for k in ks])
    slope = np.polyfit(ks, resid, 1)[0]  # the intercept absorbs the body's error, the same for every k
    return max(float(slope) / spec.num_layers * 1e6, 0.0)


def ragged_sequence_cost(backend: str, d: dict, progress=None) -> dict:
    """{"ragged_sequence_us": µs, "splits_ms": measured split times} for one engine backend (fp32, eager), on
    the speed reference's engine (the calibration model)."""
    from perfmodel.costmodel.operators import Precision
    from perfmodel.specs.hardware import hardware_from_dict
    from perfmodel.validation.reference import Reference

    if progress:
        progress(f"{backend} ragged serving step")
    flash = backend == "torch"
    engine = Reference().engine(backend)
    measured = measure_splits(engine)
    hw = hardware_from_dict(d, "calibration").for_engine(backend)
    us = fit_sequence_cost(engine.spec, hw, measured, Precision("fp32", "fp32", "fp32"), flash)
    return {"ragged_sequence_us": round(us, 2), "splits_ms": {str(k): round(v * 1e3, 2) for k, v in measured.items()}}


def reference_engine(backend: str):
    """The calibration model's eager engine (random weights, fp32): the fixed engine of the speed reference
    (perfmodel.validation.reference)."""
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.transformer import Transformer
    from perfmodel.validation.calibrate import CALIBRATION_MODEL

    spec, weights, _ = load_engine_model(CALIBRATION_MODEL, None)
    return Transformer(spec, weights, make_backend(backend), flash=backend == "torch")
