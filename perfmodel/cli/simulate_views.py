"""simulate's outputs beside its single-rate table: the rate sweep (table, JSON/CSV rows, plot)."""

from __future__ import annotations

from pathlib import Path

from perfmodel.cli.planning_commands import banded
from perfmodel.output import console, emit, print_table


def run_sweep(dep, reqs, offered: float, rates, cfg, ttft, tpot, sat: dict | None, fmt: str, plot: Path | None,
              title: str, bands: bool = True, sim=None) -> None:
    """Simulate the request list at every rate with a progress bar; print the table or JSON/CSV; plot."""
    from rich.progress import Progress

    from perfmodel.planning import ratesweep
    from perfmodel.planning.simulate import simulate

    sat_rps = sat["rate_rps"] if sat else None
    with Progress(transient=True, disable=fmt != "table") as prog:
        task = prog.add_task("simulating rates", total=len(rates))
        res = ratesweep.sweep(dep, reqs, offered, rates, cfg, ttft, tpot, sat_rps, bands,
                              progress=lambda: prog.advance(task), sim=sim or simulate)
    res["saturation"] = sat
    if plot is not None:
        res["plot"] = str(ratesweep.plot(res, plot, title))
    flat = [{k: (v if not isinstance(v, list) else "|".join(f"{x:.6g}" for x in v)) for k, v in r.items()}
            for r in res["rows"]]
    if emit(fmt, res, flat):
        return
    band = lambda key: lambda r: banded(r[key], r.get(key.replace("_s", "_band_s")))  # noqa: E731
    rows = [{**r, **{k: band(k)(r) for k in ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")}}
            for r in res["rows"]]
    print_table(rows, title=title + (" (band: optimistic–pessimistic efficiency)" if bands else ""), columns={
        "rate_rps": ("rate/s", lambda v: f"{v:g}"), "ttft_p50_s": ("TTFT p50", str), "ttft_p90_s": ("TTFT p90", str),
        "tpot_p50_s": ("TPOT p50", str), "tpot_p90_s": ("TPOT p90", str),
        "served_rps": ("served/s", lambda v: f"{v:.3g}"),
        "throughput_output_tokens_per_s": ("tok/s", lambda v: f"{v:,.0f}"),
        "rho": ("ρ", lambda v: "n/a" if v is None else f"{v:.2f}")})
    c = console()
    knee = res["knee_rps"]
    c.print(f"measured knee {knee:.3g} req/s (the served rate once the queue never empties)" if knee else
            f"measured knee: not reached (the top rate is served at ≥ {ratesweep.OVERLOAD:.0%}); sweep higher")
    if sat:
        gap = f"; knee/closed form = {knee / sat['rate_rps']:.2f}" if knee else ""
        c.print(f"closed-form saturation {sat['rate_rps']:.3g} req/s ({sat['bound']}-bound){gap}")
    if plot is not None:
        c.print(f"plot: {res['plot']}")
