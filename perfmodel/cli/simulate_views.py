"""simulate's outputs beside its single-rate table: the rate sweep (table, JSON/CSV rows, plot)."""

from __future__ import annotations

from pathlib import Path

from perfmodel.cli.planning_commands import banded
from perfmodel.output import console, emit, print_table, seconds, si


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


def print_split(r: dict, dep, offered: float) -> None:
    """The disaggregated run's pools: KV transfer, busy fractions, the split's saturation and ρ."""
    d, sat = r["disaggregation"], r["saturation"]
    link = dep.hardware.interconnect
    console().print(
        f"{d['prefill']}:{d['decode']} prefill:decode instances; KV transfer p50 {seconds(d['kv_transfer_s']['p50'])}"
        f" ({si(d['kv_transfer_bytes_mean'], 'B')} per prompt over {link.name}, {link.bandwidth_gbps:g} GB/s + "
        f"{link.latency_us:g} µs); prefill pool busy {d['prefill_busy'] * 100:.0f} %, decode pool busy "
        f"{d['decode_busy'] * 100:.0f} %\nsaturation {sat['rate_rps']:.3g} req/s ({sat['bound']}-bound: prefill pool "
        f"{sat['prefill_rps']:.3g}, decode pool {sat['decode_rps']:.3g} req/s); ρ = {r['rho']:.2f} at "
        f"{offered:.3g} req/s (demand over capacity)")


def plan_split_for(best: dict, model, hw, precision, mode: str, inp, out, rate, trace, ttft: float, tpot: float,
                   percentile: float) -> dict:
    """plan --disaggregate: the cheapest P:D of the plan's chosen shape (TP·PP) at the offered load."""
    from perfmodel.costmodel.parallel import Parallelism
    from perfmodel.planning.deploy import Deployment
    from perfmodel.planning.disaggregate import plan_disaggregated, plan_requests
    from perfmodel.planning.workload import trace_requests

    dep = Deployment(model, hw, Parallelism(best["tp"], best["pp"]), precision, exec_mode=mode)
    reqs = trace_requests(trace) if trace is not None else plan_requests(inp, out, rate)
    res = plan_disaggregated(dep, reqs, ttft, tpot, percentile, rate=rate if trace is None else None)
    res.pop("tried", None) if res["best"] else None
    return res


def print_plan_split(res: dict, colocated: dict, percentile: float) -> None:
    c = console()
    if not res["best"]:
        c.print(f"disaggregated: {res['reason']}")
        return
    b = res["best"]
    q = f"{percentile:g}"
    money = "" if b["cost_per_million_output_tokens_usd"] is None else \
        f", ${b['cost_per_million_output_tokens_usd']:,.2f} per million output tokens"
    c.print(f"disaggregated (simulated at {res['rate_rps']:.3g} req/s): {b['prefill']}:{b['decode']} prefill:decode "
            f"× TP{b['tp']}·PP{b['pp']} = {b['gpus']} GPUs (colocated: {colocated['gpus']}); p{q} TTFT "
            f"{banded(b[f'ttft_p{q}_s'], b['ttft_band_s'])}, TPOT {banded(b[f'tpot_p{q}_s'], b['tpot_band_s'])}; "
            f"ρ = {b['rho']:.2f}{money}")
