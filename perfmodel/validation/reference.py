"""The machine's speed right now, from a fixed reference step timed beside every measurement.

A shared VM does not run at one speed: on the 2-core development VM a SmolLM2-135M decode step's 3-second
median wanders by 4-8 % (coefficient of variation over a minute), and calibrate, validate and serve-bench
each run minutes apart. The same wander shows in any other forward: a decode step of the calibration model
timed in alternation tracks it with a correlation of 0.95-0.96, and the ratio of the two varies by only
1.2-2.4 %. So every measurement is taken beside the reference step and rescaled to the speed the machine had
when calibrate timed the same step (provenance.reference_step_ms), the way a benchmark is stated as a ratio
against a baseline run in the same process. What is left is the per-call jitter (about 10 % per call), which
the repeats average.

The machine has two speeds, not one. On a later VM of the same kind, a compute-bound forward (a SmolLM2
prefill of 128 tokens) moved *against* the decode reference (correlation -0.56 over a minute of alternation:
when streaming slowed, arithmetic sped up), so dividing a prefill by the decode reference doubled its spread
(7.4 % -> 13.8 % per call), while a 512^3 matmul timed beside it tracked it with a correlation of 0.90
(spread 3.2 %). So a second reference, that matmul, stands for the compute speed
(provenance.reference_matmul_ms), and a point is rescaled by the two speeds weighted by the share of its
predicted time that is compute-bound (`mixed_speed`).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

CONTEXT = 100  # the reference: one decode step of the calibration model (batch 1) after this many tokens
MATMUL_N = 512  # the compute reference: one [n, n] x [n, n] fp32 matmul (about 1 ms on 2 cores)


class Reference:
    """One reference engine per backend (eager, fp32, random weights), loaded on first use and shared by every
    Reference of the process (calibrate builds several runners; each would load 450 MB of weights again)."""

    _engines: dict = {}

    def engine(self, backend: str):
        return self._setup(backend)[0]

    def _setup(self, backend: str):
        if backend not in self._engines:
            from perfmodel.engine.transformer import KVCache
            from perfmodel.validation.ragged_calibration import reference_engine

            engine = reference_engine(backend)
            cache = KVCache(engine.be, engine.spec, 1, CONTEXT + 2)
            for t in cache.k + cache.v:
                t[...] = 0.1
            self._engines[backend] = (engine, cache, np.zeros((1, 1), dtype=np.int64))
        return self._engines[backend]

    def seconds(self, backend: str, calls: int = 3) -> float:
        """Median seconds of `calls` reference decode steps now."""
        from perfmodel.validation.validate import _inference_mode

        engine, cache, ids = self._setup(backend)
        times = []
        with _inference_mode(backend):
            for _ in range(calls):
                cache.length = CONTEXT
                t0 = time.perf_counter()
                engine.forward(ids, cache)
                engine.be.sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    _operands: dict = {}

    def matmul_seconds(self, backend: str, calls: int = 3) -> float:
        """Median seconds of `calls` compute-reference matmuls now."""
        engine = self._setup(backend)[0]
        be = engine.be
        if backend not in self._operands:
            rng = np.random.default_rng(0)
            self._operands[backend] = tuple(be.asarray(rng.random((MATMUL_N, MATMUL_N), dtype=np.float32))
                                            for _ in range(2))
        a, b = self._operands[backend]
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            be.matmul(a, b)
            be.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def calibration_reference_s(hw, backend: str) -> float | None:
    """The reference step's seconds when the hardware file was calibrated (None: not recorded)."""
    ms = (hw.provenance.get("reference_step_ms") or {}).get(backend)
    return float(ms) * 1e-3 if ms else None


def calibration_matmul_s(hw, backend: str) -> float | None:
    """The compute reference's seconds at calibration (None: not recorded, a file from before it)."""
    ms = (hw.provenance.get("reference_matmul_ms") or {}).get(backend)
    return float(ms) * 1e-3 if ms else None


def mixed_speed(memory_ratio: float, compute_ratio: float | None, compute_share: float) -> float:
    """How many times slower than at calibration a point runs whose predicted time is compute_share
    compute-bound: the two references' ratios (now over calibration) weighted in the log. Without a compute
    reference, the decode reference's ratio alone."""
    if compute_ratio is None:
        return memory_ratio
    w = min(max(compute_share, 0.0), 1.0)
    return float(np.exp(w * np.log(compute_ratio) + (1 - w) * np.log(memory_ratio)))


def compute_speed_factor(hw, backend: str, seconds_now: list[float]) -> float | None:
    """speed_factor's counterpart for the compute reference (the matmul); None where the file has none."""
    base = calibration_matmul_s(hw, backend)
    if base is None or not seconds_now:
        return None
    return float(statistics.median(seconds_now)) / base


def speed_factor(hw, backend: str, seconds_now: list[float]) -> float | None:
    """How many times slower the machine runs now than when it was calibrated: the reference step timed now
    (e.g. before and after a serving run) against calibrate's. None where the file holds no reference."""
    base = calibration_reference_s(hw, backend)
    if base is None or not seconds_now:
        return None
    return float(statistics.median(seconds_now)) / base
