"""Per-request TTFT/TPOT/E2E and the summary figures every serving run reports (simulated, disaggregated or
measured by serve-bench), computed one way so that measured and simulated are compared like for like."""

from __future__ import annotations

import numpy as np


def percentiles(x: np.ndarray) -> dict:
    return {f"p{q}": float(np.percentile(x, q)) for q in (50, 90, 99)}


def request_latencies(arrival, first, finish, out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTFT, TPOT (0 for one-token outputs) and E2E per request, in seconds."""
    arrival, first, finish, out = (np.asarray(v, dtype=np.float64) for v in (arrival, first, finish, out))
    ttft = first - arrival
    tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
    return ttft, tpot, finish - arrival


def latency_summary(arrival, first, finish, out, ttft_slo: float | None = None,
                    tpot_slo: float | None = None) -> dict:
    """Latency percentiles, throughput, goodput and SLO attainment of one run's requests."""
    out = np.asarray(out)
    ttft, tpot, e2e = request_latencies(arrival, first, finish, out)
    n = len(ttft)
    span = float(np.max(finish) - np.asarray(arrival)[0])
    good = np.ones(n, dtype=bool)
    if ttft_slo:
        good &= ttft <= ttft_slo
    if tpot_slo:
        good &= tpot <= tpot_slo
    dec = out > 1
    return {"requests": n, "duration_s": span, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "e2e_s": percentiles(e2e), "mean_ttft_s": float(ttft.mean()),
            "mean_tpot_s": float(tpot[dec].mean()) if dec.any() else 0.0,
            "throughput_output_tokens_per_s": float(out.sum() / span), "throughput_requests_per_s": n / span,
            "goodput_requests_per_s": float(good.sum() / span), "slo_attainment": float(good.mean())}
