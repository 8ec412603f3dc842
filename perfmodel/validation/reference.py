"""The machine's speed right now, from a fixed reference step timed beside every measurement.

A shared VM does not run at one speed: on the 2-core development VM a SmolLM2-135M decode step's 3-second
median wanders by 4-8 % (coefficient of variation over a minute), and calibrate, validate and serve-bench
each run minutes apart. The same wander shows in any other forward: a decode step of the calibration model
timed in alternation tracks it with a correlation of 0.95-0.96, and the ratio of the two varies by only
1.2-2.4 %. So every measurement is taken beside the reference step and rescaled to the speed the machine had
when calibrate timed the same step (provenance.reference_step_ms), the way a benchmark is stated as a ratio
against a baseline run in the same process. What is left is the per-call jitter (about 10 % per call), which
the repeats average.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

CONTEXT = 100  # the reference: one decode step of the calibration model (batch 1) after this many tokens


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


def calibration_reference_s(hw, backend: str) -> float | None:
    """The reference step's seconds when the hardware file was calibrated (None: not recorded)."""
    ms = (hw.provenance.get("reference_step_ms") or {}).get(backend)
    return float(ms) * 1e-3 if ms else None


def speed_factor(hw, backend: str, seconds_now: list[float]) -> float | None:
    """How many times slower the machine runs now than when it was calibrated: the reference step timed now
    (e.g. before and after a serving run) against calibrate's. None where the file holds no reference."""
    base = calibration_reference_s(hw, backend)
    if base is None or not seconds_now:
        return None
    return float(statistics.median(seconds_now)) / base
