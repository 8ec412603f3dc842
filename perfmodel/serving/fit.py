"""Fit the few cost-model terms a serving step depends on from serve-bench's own step records.

The calibrated hardware YAML predicts this machine's operators from micro-benchmarks; a serving step of
SmolLM2-135M on a 2-core VM is dominated by its weight matmuls at 2-300 rows, where those numbers are
least certain (the VM's bandwidth moves from run to run). This fits three terms of the engine's hardware
profile, on the measured forward time of each step of given runs (least squares on log time):
the matmul compute and memory efficiency multipliers (efficiency.kind_compute/kind_memory.matmul) and the
row count at which a matmul reaches half its compute efficiency (efficiency.matmul_half_dim). Everything else
(one-row GEMVs, attention, norms, dispatch costs) stays as calibrated. Fit on one run, check on others.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from perfmodel.costmodel.ragged import body_ops, head_ops
from perfmodel.costmodel.roofline import op_timings
from perfmodel.errors import PerfmodelError
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.simulate import StepCosts
from perfmodel.specs.hardware import HardwareSpec

TERMS = ("matmul_compute", "matmul_memory", "matmul_half_dim")
BOUNDS = (0.05, 20.0)  # each multiplier, against the calibrated value


def with_terms(hw: HardwareSpec, mult: dict) -> HardwareSpec:
    e = hw.efficiency
    kc, km = dict(e.kind_compute), dict(e.kind_memory)
    kc["matmul"] = kc.get("matmul", 1.0) * mult["matmul_compute"]
    km["matmul"] = km.get("matmul", 1.0) * mult["matmul_memory"]
    half = (e.matmul_half_dim or 1.0) * mult["matmul_half_dim"]
    return dataclasses.replace(hw, efficiency=dataclasses.replace(e, kind_compute=kc, kind_memory=km,
                                                                  matmul_half_dim=half))


class _Steps:
    """Measured steps and the parts of their predicted time the fitted terms do not touch."""

    def __init__(self, dep: Deployment, steps: list[dict]):
        if not steps:
            raise PerfmodelError("--fit-steps: the records hold no steps")
        self.dep = dep
        costs = StepCosts(dep)
        self.tokens = np.array([sum(n for n, _ in s["sequences"]) for s in steps])
        self.seqs = np.array([len(s["sequences"]) for s in steps])
        self.measured = np.array([s["forward_s"] for s in steps])
        self.attention = np.array([sum(costs.attention(int(n), int(p)) for n, p in s["sequences"]) for s in steps])

    def predict(self, hw: HardwareSpec) -> np.ndarray:
        d = self.dep
        p, mode = d.precision, d.exec_mode
        total = np.zeros(len(self.tokens))
        for uniq, col, ops_of, host in ((np.unique(self.tokens), self.tokens,
                                         lambda x: body_ops(d.model, x, p, d.flash, mode), True),
                                        (np.unique(self.seqs), self.seqs,
                                         lambda x: head_ops(d.model, x, p, d.flash, mode), False)):
            ts = op_timings(ops_of(uniq), hw, p, mode, host=host)
            part = sum(np.broadcast_to(np.asarray(t.time_s, dtype=np.float64), uniq.shape) * t.op.layers for t in ts)
            total += part[np.searchsorted(uniq, col)]
        return total + self.attention


def fit_terms(dep: Deployment, steps: list[dict], rounds: int = 4) -> tuple[HardwareSpec, dict]:
    """(hardware with the fitted terms, report): coordinate descent in log space, golden-section per term."""
    data = _Steps(dep, steps)
    base = dep.hardware

    # decode-only steps outnumber the steps with a prefill chunk many times over at low load; weigh the two
    # kinds equally, so the fit serves TTFT (prefill steps) as much as TPOT (decode steps)
    has_prefill = np.array([any(n > 1 for n, _ in s["sequences"]) for s in steps])
    w = np.where(has_prefill, 1.0 / max(has_prefill.sum(), 1), 1.0 / max((~has_prefill).sum(), 1))
    w /= w.sum()

    def loss(x: np.ndarray) -> float:
        pred = data.predict(with_terms(base, dict(zip(TERMS, np.exp(x)))))
        return float(np.sum(w * np.log(pred / data.measured) ** 2))

    x = np.zeros(len(TERMS))
    lo, hi = np.log(BOUNDS[0]), np.log(BOUNDS[1])
    g = (np.sqrt(5) - 1) / 2
    for _ in range(rounds):
        for i in range(len(TERMS)):
            a, b = lo, hi
            for _ in range(30):
                c, d = b - g * (b - a), a + g * (b - a)
                xc, xd = x.copy(), x.copy()
                xc[i], xd[i] = c, d
                if loss(xc) < loss(xd):
                    b = d
                else:
                    a = c
            x[i] = (a + b) / 2
    mult = dict(zip(TERMS, np.exp(x).tolist()))
    fitted = with_terms(base, mult)
    err = lambda hw: np.abs(data.predict(hw) / data.measured - 1) * 100  # noqa: E731
    before, after = err(base), err(fitted)
    return fitted, {"terms": mult, "steps": int(len(data.measured)),
                    "median_abs_error_pct_before": float(np.median(before)),
                    "median_abs_error_pct_after": float(np.median(after)),
                    "p90_abs_error_pct_before": float(np.percentile(before, 90)),
                    "p90_abs_error_pct_after": float(np.percentile(after, 90))}


def step_errors(dep: Deployment, steps: list[dict]) -> dict:
    """Median and p90 |error| of the predicted forward time per step (for a run the fit did not see)."""
    data = _Steps(dep, steps)
    e = np.abs(data.predict(dep.hardware) / data.measured - 1) * 100
    return {"steps": int(len(e)), "median_abs_error_pct": float(np.median(e)), "p90_abs_error_pct": float(np.percentile(e, 90))}
