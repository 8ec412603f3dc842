"""Rate sweep: one workload simulated at a range of offered rates, the knee located, and its plot.

Every rate runs the SAME request list: one Poisson draw (or a trace) at unit rate whose inter-arrival gaps are
scaled by 1/rate, so the lengths and the shape of the arrivals are identical and only the load changes. A curve
built from fresh draws per rate wobbles by the draw, which near the knee is larger than the effect measured.

The measured knee is the capacity the sweep shows: once an offered rate overloads the deployment the queue
never empties and the served rate stays at the capacity, so the knee is the highest served rate in the sweep
(found only when the sweep's top rate is overloaded: served below OVERLOAD of offered). It is compared with
the closed-form saturation rate (perfmodel.planning.saturation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from perfmodel.errors import PerfmodelError, show
from perfmodel.planning.deploy import Deployment
from perfmodel.planning.simulate import SchedulerConfig, simulate
from perfmodel.planning.workload import Requests

RATES_MAX = 200  # points in one sweep
OVERLOAD = 0.9  # served/offered below this at the top rate: the sweep has passed the knee
BANDS = ("optimistic", "pessimistic")


def parse_rates(text: str) -> np.ndarray:
    """'LO:HI:STEP' (HI included) or 'R1,R2,...': offered rates in requests/s, increasing."""
    where = f"--rates: {show(text)}"
    allowed = "LO:HI:STEP (e.g. 1:20:1) or a list R1,R2,... of rates > 0"
    try:
        if ":" in str(text):
            parts = [float(p) for p in str(text).split(":")]
            if len(parts) != 3:
                raise ValueError
            lo, hi, step = parts
            if not (np.isfinite(parts).all() and lo > 0 and hi >= lo and step > 0):
                raise ValueError
            if (hi - lo) / step + 1 > RATES_MAX:
                raise PerfmodelError(f"{where}: more than {RATES_MAX} rates; allowed: a coarser STEP")
            rates = lo + step * np.arange(int(np.floor((hi - lo) / step + 1e-9)) + 1)
        else:
            rates = np.array([float(p) for p in str(text).split(",") if p.strip()])
            if rates.size == 0 or not np.isfinite(rates).all() or (rates <= 0).any():
                raise ValueError
    except ValueError:
        raise PerfmodelError(f"{where} is not valid; allowed: {allowed}") from None
    if rates.size > RATES_MAX:
        raise PerfmodelError(f"{where}: {rates.size} rates; allowed: at most {RATES_MAX}")
    return np.unique(rates)


def at_rate(reqs: Requests, offered: float, rate: float) -> Requests:
    """The request list offered at `offered` requests/s, offered at `rate` instead (gaps scaled by
    offered/rate, lengths unchanged). A Poisson draw at rate 1 scaled to R is exactly the draw at R with the same
    seed (NumPy scales a standard exponential), so a sweep row equals `simulate --rate R`."""
    return dataclasses.replace(reqs, arrival_s=reqs.arrival_s * (offered / rate))


def latency_bands(dep: Deployment, reqs: Requests, cfg: SchedulerConfig, ttft_slo=None, tpot_slo=None,
                  sim=simulate) -> dict:
    """The simulated percentiles under the hardware's optimistic and pessimistic efficiencies:
    {metric: {pXX: [optimistic, pessimistic]}} for ttft_s, tpot_s, e2e_s."""
    runs = [sim(dataclasses.replace(dep, hardware=dep.hardware.with_efficiency(w)), reqs, cfg, ttft_slo, tpot_slo)
            for w in BANDS]
    return {m: {q: [float(r[m][q]) for r in runs] for q in runs[0][m]} for m in ("ttft_s", "tpot_s", "e2e_s")}


def sweep(dep: Deployment, reqs: Requests, offered: float, rates, cfg: SchedulerConfig, ttft_slo=None,
          tpot_slo=None, saturation_rps: float | None = None, bands: bool = True, progress=None,
          sim=simulate) -> dict:
    """Simulate `reqs` (drawn or traced at `offered` requests/s) at every rate. Rows: rate, TTFT/TPOT p50/p90 (with bands), served rate, throughput, rho.
    saturation_rps: the closed-form capacity (rho = rate / it). sim: the simulator (colocated or disaggregated)."""
    rows = []
    for rate in np.asarray(rates, dtype=np.float64):
        at = at_rate(reqs, offered, float(rate))
        r = sim(dep, at, cfg, ttft_slo, tpot_slo)
        band = latency_bands(dep, at, cfg, ttft_slo, tpot_slo, sim) if bands else None
        row = {"rate_rps": float(rate)}
        for m in ("ttft_s", "tpot_s"):
            for q in ("p50", "p90"):
                row[f"{m[:-2]}_{q}_s"] = float(r[m][q])
                if band:
                    row[f"{m[:-2]}_{q}_band_s"] = band[m][q]
        row.update({"served_rps": float(r["throughput_requests_per_s"]),
                    "throughput_output_tokens_per_s": float(r["throughput_output_tokens_per_s"]),
                    "goodput_rps": float(r["goodput_requests_per_s"]), "preemptions": int(r["preemptions"]),
                    "rho": float(rate) / saturation_rps if saturation_rps else None})
        rows.append(row)
        if progress:
            progress()
    return {"rows": rows, "saturation_rps": saturation_rps, "knee_rps": measured_knee(rows)}


def measured_knee(rows: list[dict]) -> float | None:
    """The highest served rate, when the sweep's top rate is overloaded; None when the sweep stays below."""
    if not rows or rows[-1]["served_rps"] >= OVERLOAD * rows[-1]["rate_rps"]:
        return None
    return max(r["served_rps"] for r in rows)


def plot(result: dict, path: Path, title: str) -> Path:
    """TTFT and TPOT p50/p90 (bands shaded) against the offered rate, the closed-form saturation and the
    measured knee marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perfmodel.output import atomic_write

    rows = result["rows"]
    x = [r["rate_rps"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, m, label in ((axes[0], "ttft", "TTFT (s)"), (axes[1], "tpot", "TPOT (s)")):
        for q, style in (("p50", "-"), ("p90", "--")):
            ax.plot(x, [r[f"{m}_{q}_s"] for r in rows], style, color="C0", marker=".", label=q)
            if f"{m}_{q}_band_s" in rows[0]:
                ax.fill_between(x, [r[f"{m}_{q}_band_s"][0] for r in rows], [r[f"{m}_{q}_band_s"][1] for r in rows],
                                color="C0", alpha=0.12 if q == "p50" else 0.06, lw=0,
                                label=f"{q} optimistic–pessimistic band")
        if result.get("saturation_rps"):
            ax.axvline(result["saturation_rps"], color="C2", ls=":", lw=1.2,
                       label=f"closed-form saturation {result['saturation_rps']:.3g}/s")
        if result.get("knee_rps"):
            ax.axvline(result["knee_rps"], color="k", lw=1, label=f"measured knee {result['knee_rps']:.3g}/s")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        plt.close(fig)
        raise PerfmodelError(f"--plot: {show(str(path))} is not valid; allowed: a path ending in .png, .svg or .pdf")
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix[1:].lower()))
    finally:
        plt.close(fig)
    return path
