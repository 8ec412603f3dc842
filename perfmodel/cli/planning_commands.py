"""Commands for capacity planning: plan, simulate, speculative, compare."""

from __future__ import annotations

from pathlib import Path

import typer

from perfmodel.cli.app import app
from perfmodel.cli.options import DEFAULT_HARDWARE, DEFAULT_MODEL, int_list, names, plain_name
from perfmodel.cli.runtime_options import EXEC_OPT, FRAMEWORK_OPT, runtime, runtime_precision
from perfmodel.errors import PerfmodelError, bad_value
from perfmodel.output import check_format, console, emit, print_table, seconds, si

FORMAT_HELP = "table | json | csv"


def _lengths(inp: str, out: str, trace: Path | None, n: int = 2000):
    import numpy as np

    from perfmodel.planning.workload import LengthDist, trace_requests

    if trace is not None:
        r = trace_requests(trace)
        return r.input_tokens, r.output_tokens
    rng = np.random.default_rng(0)
    return LengthDist.parse("--input", inp).sample(n, rng), LengthDist.parse("--output", out).sample(n, rng)


def banded(nominal: float, band) -> str:
    """'120 ms (95 ms–180 ms)': the nominal and its optimistic–pessimistic band."""
    if not band:
        return seconds(nominal)
    return f"{seconds(nominal)} ({seconds(band[0])}–{seconds(band[1])})"


def _precision(dtype, weight_dtype, kv_dtype):
    from perfmodel.costmodel.operators import Precision

    return Precision(weight_dtype or dtype, dtype, kv_dtype or dtype)


@app.command()
def plan(
    model: str = typer.Option(DEFAULT_MODEL), hardware: str = typer.Option(DEFAULT_HARDWARE),
    input: str = typer.Option("1024", "--input", help="N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEDIAN:SIGMA"),
    output: str = typer.Option("256", help="as --input"),
    trace: Path = typer.Option(None, help="CSV of requests (arrival_s, input_tokens, output_tokens)"),
    rate: float = typer.Option(None, help="requests per second (default: the trace's rate, or one replica)"),
    ttft: float = typer.Option(2.0, help="TTFT SLO in seconds"), tpot: float = typer.Option(0.05, help="TPOT SLO, s"),
    percentile: float = typer.Option(90.0, help="the SLO holds for this percentile of request lengths"),
    dtype: str = typer.Option("bf16"), weight_dtype: str = typer.Option(None), kv_dtype: str = typer.Option(None),
    max_tp: int = typer.Option(8), max_pp: int = typer.Option(4),
    spare: int = typer.Option(0, help="replicas that may be down while the SLO still holds (N+1: 1)"),
    disaggregate: bool = typer.Option(False, "--disaggregate/--no-disaggregate",
                                      help="also search prefill:decode splits of the chosen shape (simulated)"),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """The cheapest deployment (tensor/pipeline degree, batch, replicas) that meets the TTFT and TPOT SLOs."""
    import numpy as np

    from perfmodel.planning.planner import SLO, PlanInput, check_slo, plan as run_plan
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    inp, out = _lengths(input, output, trace)
    if rate is None and trace is not None:
        from perfmodel.planning.workload import trace_requests
        r = trace_requests(trace)
        rate = len(r) / max(float(r.arrival_s[-1]), 1e-9)
    if rate is not None and rate <= 0:
        raise bad_value("--rate", rate, "requests per second > 0")
    m = load_model(model)
    if not m.is_decoder_only:
        raise PerfmodelError(f"--model: plan serves decoder-only models; {m.name} is {m.architecture} "
                             "(use analyze for its request cost)")
    hw, mode, prof = runtime(load_hardware(hardware), exec, framework)
    prec = runtime_precision(_precision(dtype, weight_dtype, kv_dtype), hw, prof)
    result = run_plan(m, hw, PlanInput(np.asarray(inp), np.asarray(out), rate),
                      check_slo(SLO(ttft, tpot, percentile)), prec, max_tp, max_pp, exec_mode=mode, spare=spare)
    if disaggregate and result["feasible"]:
        from perfmodel.cli.simulate_views import plan_split_for

        result["disaggregation"] = plan_split_for(result["best"], m, hw, prec, mode, inp, out, rate, trace, ttft,
                                                  tpot, percentile)
    if emit(format, result, result["options"]):
        return
    c = console()
    if not result["feasible"]:
        c.print(f"[red]nothing fits[/red]: no configuration of {model} on {hardware} meets TTFT ≤ {ttft} s and "
                f"TPOT ≤ {tpot} s. {result['reason']}.")
        return
    b = result["best"]
    money = lambda v: "n/a" if v is None else f"${v:,.2f}"  # noqa: E731
    spare_txt = f" ({spare} spare: the SLO holds with {spare} down)" if spare else ""
    c.print(f"[bold]{result['model']} on {result['hardware']}[/bold]: {b['gpus']} GPUs = {b['replicas']} "
            f"replica(s){spare_txt} × TP{b['tp']}·PP{b['pp']}, batch {b['batch']} (fits {b['max_batch_fits']})")
    c.print(f"p{percentile:g} TTFT {banded(b['ttft_s'], b['ttft_band_s'])}, TPOT {banded(b['tpot_s'], b['tpot_band_s'])}"
            f" (band: optimistic–pessimistic efficiency); {b['per_gpu_output_tokens_per_s']:,.0f} output tokens/s per "
            f"GPU; {money(b['cost_per_million_output_tokens_usd'])} per million output tokens")
    if b["saturation_rps_per_replica"]:
        rho = "" if b["rho"] is None else f"; ρ = {b['rho']:.2f} at {rate:g} req/s" + (
            f" ({b['rho_spare_down']:.2f} with {spare} down)" if spare else "")
        c.print(f"saturation {b['saturation_rps_per_replica']:.3g} req/s per replica ({b['saturation_bound']}-bound)"
                f"{rho}")
    c.print(f"binding constraint — {b['binding']}")
    for which in ("optimistic", "pessimistic"):
        o = result["band"][which]
        if o and o.get("gpus"):
            c.print(f"  {which}: {o['gpus']} GPUs, batch {o['batch']}, {o['per_gpu_output_tokens_per_s']:,.0f} "
                    f"tokens/s/GPU, {money(o['cost_per_million_output_tokens_usd'])}/M tokens")
    cols = {"tp": ("TP", str), "pp": ("PP", str), "batch": ("batch", str), "replicas": ("replicas", str),
            "gpus": ("GPUs", str), "ttft": ("TTFT (band)", str), "tpot": ("TPOT (band)", str),
            "per_gpu_output_tokens_per_s": ("tok/s/GPU", lambda v: f"{v:,.0f}"),
            "rho": ("ρ", lambda v: "n/a" if v is None else f"{v:.2f}"),
            "cost_per_million_output_tokens_usd": ("$/M tok", money)}
    rows = [{**o, "ttft": banded(o["ttft_s"], o["ttft_band_s"]), "tpot": banded(o["tpot_s"], o["tpot_band_s"])}
            for o in result["options"]]
    print_table(rows, title="every configuration that meets the SLO", columns=cols)
    if result.get("disaggregation"):
        from perfmodel.cli.simulate_views import print_plan_split

        print_plan_split(result["disaggregation"], b, percentile)


def _saturation_fields(dep, reqs, max_batch: int, block_tokens: int, kv_blocks: int, offered: float,
                       prefix_cache: bool = False, split=None, cfg=None) -> dict:
    """The closed-form saturation point of the simulated deployment and the utilisation ρ at the offered rate."""
    from perfmodel.planning.saturation import saturation, utilisation

    if split is not None:  # P prefill and D decode instances: the pool that saturates first
        from perfmodel.planning.disaggregate import split_capacity, split_saturation

        sat = split_saturation(split_capacity(dep, reqs.input_tokens, reqs.output_tokens, cfg), split)
        return {"saturation": sat, "offered_rate_rps": offered, "rho": utilisation(offered, sat)}

    shared = int(reqs.shared_prefix().max()) if prefix_cache else 0  # cached prefix blocks skip prefill
    sat = saturation(dep, reqs.input_tokens, reqs.output_tokens, max_batch, kv_blocks, block_tokens,
                     shared_prefix=shared)
    return {"saturation": sat, "offered_rate_rps": offered, "rho": utilisation(offered, sat)}


@app.command()
def simulate(
    model: str = typer.Option(DEFAULT_MODEL), hardware: str = typer.Option(DEFAULT_HARDWARE),
    rate: float = typer.Option(5.0, help="Poisson arrivals per second"),
    requests: int = typer.Option(2000, help="requests to simulate"),
    input: str = typer.Option("1024", "--input"), output: str = typer.Option("256"),
    trace: Path = typer.Option(None, help="CSV trace instead of Poisson arrivals"),
    tp: int = typer.Option(1), pp: int = typer.Option(1),
    max_batch: int = typer.Option(256), block_tokens: int = typer.Option(16),
    chunked_prefill: int = typer.Option(0, help="prefill token budget per iteration (0: off)"),
    kv_blocks: int = typer.Option(0, help="KV blocks in the pool (0: as many as fit beside the weights)"),
    prefix_cache: bool = typer.Option(False, "--prefix-cache/--no-prefix-cache",
                                      help="reuse the shared prefix's KV blocks across requests"),
    shared_prefix: int = typer.Option(0, help="tokens of a system prompt in front of every prompt"),
    ttft: float = typer.Option(None, help="TTFT SLO for goodput"), tpot: float = typer.Option(None),
    dtype: str = typer.Option("bf16"), weight_dtype: str = typer.Option(None), kv_dtype: str = typer.Option(None),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    rates: str = typer.Option(None, help="rate sweep LO:HI:STEP (e.g. 1:20:1) or R1,R2,...: the same requests at "
                                         "each rate, the knee against the closed-form saturation"),
    plot: Path = typer.Option(None, help="with --rates: write TTFT/TPOT p50/p90 against rate to FILE.png"),
    bands: bool = typer.Option(True, "--bands/--no-bands",
                               help="latency bands from the hardware's optimistic/pessimistic efficiency"),
    disaggregate: str = typer.Option(None, help="P:D: P prefill and D decode instances of the deployment, the "
                                                "prompt's KV moved over the interconnect"),
    seed: int = typer.Option(0), format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """Discrete-event simulation of continuous batching with a paged KV budget: latency percentiles, goodput."""
    from perfmodel.costmodel.parallel import Parallelism
    from perfmodel.planning.deploy import Deployment
    from perfmodel.planning.simulate import SchedulerConfig, simulate as run_sim
    from perfmodel.planning.workload import LengthDist, poisson_requests, trace_requests
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    if requests < 1 or max_batch < 1 or block_tokens < 1:
        raise PerfmodelError("--requests, --max-batch, --block-tokens: allowed: integers >= 1")
    reqs = trace_requests(trace) if trace else poisson_requests(
        rate, requests, LengthDist.parse("--input", input), LengthDist.parse("--output", output), seed)
    if shared_prefix:
        reqs = reqs.with_shared_prefix(shared_prefix)
    m = load_model(model)
    par = Parallelism(tp=tp, pp=pp)
    par.check(m)
    hw, mode, prof = runtime(load_hardware(hardware), exec, framework)
    dep = Deployment(m, hw, par, runtime_precision(_precision(dtype, weight_dtype, kv_dtype), hw, prof),
                     exec_mode=mode)
    cfg = SchedulerConfig(max_batch, block_tokens, chunked_prefill, kv_blocks, prefix_cache)
    offered = rate if not trace else len(reqs) / max(float(reqs.arrival_s[-1]), 1e-9)
    if plot is not None and not rates:
        raise PerfmodelError("--plot: draws a rate sweep; give --rates LO:HI:STEP with it")
    split, sim = None, run_sim
    if disaggregate:
        import functools

        from perfmodel.planning.disaggregate import Split, simulate_split

        split = Split.parse(disaggregate)
        sim = functools.partial(simulate_split, split=split)
    where = f"TP{tp}·PP{pp}" + (f", {split} prefill:decode instances" if split else "")
    if rates:
        from perfmodel.cli.simulate_views import run_sweep
        from perfmodel.planning.ratesweep import parse_rates
        from perfmodel.planning.simulate import kv_pool_blocks

        grid = parse_rates(rates)
        sat = _saturation_fields(dep, reqs, max_batch, block_tokens, kv_blocks or kv_pool_blocks(dep, block_tokens),
                                 offered, prefix_cache, split, cfg)["saturation"]
        run_sweep(dep, reqs, offered, grid, cfg, ttft, tpot, sat, format, plot,
                  f"{m.name} on {dep.hardware.name} ({where}): {len(reqs)} requests per rate", bands, sim)
        return
    r = sim(dep, reqs, cfg, ttft, tpot)
    r.update(_saturation_fields(dep, reqs, max_batch, block_tokens, r["kv_blocks"], offered, prefix_cache, split,
                                cfg))
    if bands:
        from perfmodel.planning.ratesweep import latency_bands

        r["band_s"] = latency_bands(dep, reqs, cfg, ttft, tpot, sim)
    band = lambda k, q: r["band_s"][k][q] if bands else None  # noqa: E731
    rows = [{"metric": k, **{q: r[k][q] for q in ("p50", "p90", "p99")},
             **{f"{q}_band": band(k, q) for q in ("p50", "p90", "p99")}} for k in ("ttft_s", "tpot_s", "e2e_s")]
    csv_rows = [{k: (v if not isinstance(v, list) else "|".join(f"{x:.6g}" for x in v)) for k, v in x.items()}
                for x in rows]
    if emit(format, r, csv_rows):
        return
    cell = lambda q: lambda row: banded(row[q], row[f"{q}_band"])  # noqa: E731
    print_table([{**x, **{q: cell(q)(x) for q in ("p50", "p90", "p99")}} for x in rows],
                title=f"{m.name} on {dep.hardware.name} ({where}): {r['requests']} requests at "
                      f"{rate if not trace else 'trace'} req/s" + (" (band: optimistic–pessimistic efficiency)"
                                                                   if bands else ""), columns={
        "metric": ("latency", str), "p50": ("p50", str), "p90": ("p90", str), "p99": ("p99", str)})
    c = console()
    c.print(f"throughput {r['throughput_output_tokens_per_s']:,.0f} output tokens/s, {r['throughput_requests_per_s']:.2f} "
            f"requests/s; goodput {r['goodput_requests_per_s']:.2f} requests/s ({r['slo_attainment'] * 100:.1f} % "
            f"within SLO); busy {r['utilisation'] * 100:.0f} % of the time; {r['preemptions']} preemptions; "
            f"{r['kv_blocks']:,} KV blocks" + (f"; prefix-cache hit rate {r['prefix_hit_rate'] * 100:.1f} %"
                                                 if prefix_cache else ""))
    if split:
        from perfmodel.cli.simulate_views import print_split

        print_split(r, dep, offered)
        return
    c.print(f"saturation {r['saturation']['rate_rps']:.3g} req/s ({r['saturation']['bound']}-bound, batch "
            f"{r['saturation']['batch']}); ρ = {r['rho']:.2f} at {offered:.3g} req/s (demand over capacity)")


@app.command()
def speculative(
    model: str = typer.Option("llama-3.1-70b", help="target model"), draft: str = typer.Option("llama-3.1-8b"),
    hardware: str = typer.Option(DEFAULT_HARDWARE),
    alpha: str = typer.Option("0.6,0.7,0.8,0.9", help="acceptance rates, or a measured table row: "
                                                      "prose/ngram, prose/int8, summarise/ngram, summarise/int8"),
    gamma: str = typer.Option("1,2,4,6,8"), context: int = typer.Option(1024), batch: int = typer.Option(1),
    measure: bool = typer.Option(False, "--measure", help="measure α and the speed-up in the engine on real text "
                                                          "(SmolLM2-135M; a few minutes), against the prediction"),
    max_new_tokens: int = typer.Option(32, help="--measure: tokens per run"),
    repeats: int = typer.Option(1, help="--measure: timed runs per point (the median is kept)"),
    table: Path = typer.Option(None, help="the α table (default: perfmodel/data/speculative_alpha.json); "
                                          "--measure writes it"),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """Expected speed-up of speculative decoding: tokens per target step (1-α^(γ+1))/(1-α) against the cost;
    --measure runs it in the engine and prints the α table and predicted against measured speed-up."""
    from perfmodel.costmodel.speculative import speculative as run
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    gammas = int_list("--gamma", gamma)
    if measure:
        return _measure_speculative(gammas, max_new_tokens, table, hardware, format, repeats)
    t, d = load_model(model), load_model(draft)
    hw, mode, prof = runtime(load_hardware(hardware), exec, framework)
    if "/" in alpha:
        from perfmodel.validation.speculative import read_alpha_table

        measured = read_alpha_table(table)
        if alpha not in measured:
            raise bad_value("--alpha", alpha, "numbers in [0, 1] or " + "|".join(sorted(measured)))
        pairs = []
        for g in gammas:
            if g not in measured[alpha]:
                raise bad_value("--gamma", g, f"{'|'.join(map(str, sorted(measured[alpha])))} (measured for {alpha})")
            pairs.append((measured[alpha][g], g))
    else:
        try:
            alphas = [float(a) for a in names("--alpha", alpha, "numbers in [0, 1], comma-separated")]
        except ValueError:
            raise bad_value("--alpha", alpha, "numbers in [0, 1], comma-separated, or a measured table row") from None
        pairs = [(a, g) for a in alphas for g in gammas]
    rows = [run(t, d, hw, a, g, context, batch, exec_mode=mode) for a, g in pairs]
    if emit(format, rows):
        return
    print_table(rows, title=f"speculative decoding: {t.name} with draft {d.name} on {hw.name}, context {context}",
                columns={"alpha": ("α", lambda v: f"{v:.3g}"), "gamma": ("γ", str),
                         "tokens_per_target_step": ("tokens/step", lambda v: f"{v:.2f}"),
                         "tpot_s": ("TPOT", seconds), "baseline_tpot_s": ("baseline", seconds),
                         "speedup": ("speed-up", lambda v: f"{v:.2f}×")})


def _measure_speculative(gammas, max_new_tokens, table, hardware, format, repeats=1) -> None:
    from perfmodel.cli.validation_commands import _newest_local
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.quantised import int8_model
    from perfmodel.engine.transformer import Transformer
    from perfmodel.specs import load_hardware
    from perfmodel.validation.speculative import alpha_table, best_rows, measure, write_alpha_table

    if max_new_tokens < 2:
        raise PerfmodelError(f"--max-new-tokens: {max_new_tokens} is not valid; allowed: an integer >= 2")
    if repeats < 1:
        raise PerfmodelError(f"--repeats: {repeats} is not valid; allowed: an integer >= 1")
    hw = load_hardware(hardware) if hardware != DEFAULT_HARDWARE else _newest_local()
    spec, weights, tok = load_engine_model("smollm2-135m")
    target = Transformer(spec, weights, make_backend("numpy"))
    rows = measure(target, tok, int8_model(spec, weights), hw, gammas, max_new_tokens, repeats=repeats)
    path = write_alpha_table(rows, table, hw.name)
    best = best_rows(rows)
    if emit(format, {"hardware": hw.name, "table": str(path), "alpha": alpha_table(rows), "best": best,
                     "rows": rows}, rows):
        return
    alpha_rows = [{"prompt/drafter": k, **{f"γ={g}": f"{a:.2f}" for g, a in sorted(v.items())}}
                  for k, v in alpha_table(rows).items()]
    print_table(alpha_rows, title="measured α (SmolLM2-135M, greedy)")
    print_table(rows, title=f"predicted vs measured decode speed-up on {hw.name}",
                columns={"prompt": ("prompt", str), "drafter": ("drafter", str), "gamma": ("γ", str),
                         "acceptance_rate": ("α", lambda v: f"{v:.2f}"),
                         "tokens_per_target_step": ("tokens/step", lambda v: f"{v:.2f}"),
                         "measured_speedup": ("measured", lambda v: f"{v:.2f}×"),
                         "predicted_speedup": ("predicted", lambda v: f"{v:.2f}×"),
                         "error_pct": ("error", lambda v: f"{v:+.0f} %")})
    print_table(best, title="each drafter at its best γ",
                columns={"prompt": ("prompt", str), "drafter": ("drafter", str), "gamma": ("γ", str),
                         "acceptance_rate": ("α", lambda v: f"{v:.2f}"),
                         "measured_speedup": ("measured", lambda v: f"{v:.2f}×"),
                         "predicted_speedup": ("predicted", lambda v: f"{v:.2f}×"),
                         "error_pct": ("error", lambda v: f"{v:+.0f} %")})
    console().print(f"α table written to {path}")


@app.command()
def compare(
    model: str = typer.Option(DEFAULT_MODEL),
    hardware: str = typer.Option("h100-sxm,a100-80gb,mi300x,l40s", help="comma-separated hardware"),
    input: int = typer.Option(1024, "--input"), output: int = typer.Option(256),
    batch: int = typer.Option(16, help="batch for the table"),
    dtype: str = typer.Option("bf16"), weight_dtype: str = typer.Option(None), kv_dtype: str = typer.Option(None),
    out_dir: Path = typer.Option(None, help="plots folder (default: reports/compare-<model>)"),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """One model and workload across accelerators: latency, throughput, memory headroom, cost per million tokens."""
    from perfmodel.planning.compare import compare as run
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    m = load_model(model)
    resolved = [runtime(load_hardware(h), exec, framework) for h in names("--hardware", hardware)]
    hws, mode = [r[0] for r in resolved], resolved[0][1]
    res = run(m, hws, input, output, batch,
              runtime_precision(_precision(dtype, weight_dtype, kv_dtype), hws[0], resolved[0][2]),
              out_dir or Path("reports") / f"compare-{m.name}", exec_mode=mode)
    if emit(format, res, res["rows"]):
        return
    money = lambda v: "n/a" if v is None else f"${v:,.2f}"  # noqa: E731
    print_table(res["rows"], title=f"{m.name}: input {input}, output {output}, batch {batch}", columns={
        "hardware": ("hardware", str), "gpus": ("GPUs (TP)", str), "fits": ("fits", str), "ttft_s": ("TTFT", seconds), "tpot_s": ("TPOT", seconds),
        "tokens_per_s": ("tokens/s", lambda v: f"{v:,.0f}"), "max_batch": ("max batch", str),
        "peak_tokens_per_s": ("peak tok/s", lambda v: f"{v:,.0f}"),
        "headroom_bytes": ("headroom", lambda v: si(v, "B")),
        "cost_per_million_tokens_usd": ("$/M tok", money)})
    console().print(f"plots: {', '.join(res['plots'])}")


@app.command()
def report(
    model: str = typer.Option(DEFAULT_MODEL), hardware: str = typer.Option(DEFAULT_HARDWARE),
    batch: int = typer.Option(8), input: int = typer.Option(1024, "--input"), output: int = typer.Option(256),
    dtype: str = typer.Option("bf16"), weight_dtype: str = typer.Option(None), kv_dtype: str = typer.Option(None),
    flash: bool = typer.Option(True, "--flash/--no-flash"),
    rate: float = typer.Option(None, help="request rate for the plan section"),
    ttft: float = typer.Option(2.0), tpot: float = typer.Option(0.05),
    name: str = typer.Option(None, help="report folder under reports/ (default <model>-<hardware>)"),
    out_root: Path = typer.Option(Path("reports"), help="where report folders go"),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """A self-contained HTML roofline report: operators on the roofline, memory, latency/throughput, table, plan."""
    import numpy as np

    from perfmodel.costmodel.request import Workload, analyze as run_analysis
    from perfmodel.planning.planner import SLO, PlanInput, check_slo, plan as run_plan
    from perfmodel.report.html import build_report
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    if name is not None:
        plain_name("--name", name)
    m = load_model(model)
    hw, mode, prof = runtime(load_hardware(hardware), exec, framework)
    a = run_analysis(m, hw, Workload(batch, input, output),
                     runtime_precision(_precision(dtype, weight_dtype, kv_dtype), hw, prof), flash,
                     exec_mode=mode)
    plan_result = None
    if m.is_decoder_only:
        plan_result = run_plan(m, hw, PlanInput(np.array([input]), np.array([output]), rate),
                               check_slo(SLO(ttft, tpot)), a.precision, exec_mode=mode)
    folder = out_root / (name if name is not None else f"{m.name}-{hw.name}")
    path = build_report(a, plan_result, folder, f"{m.name} on {hw.description}")
    result = {"report": str(path), "figures": sorted(str(p) for p in folder.glob("*.png"))}
    if emit(format, result, [result]):
        return
    console().print(f"wrote [bold]{path}[/bold] (+ {', '.join(Path(f).name for f in result['figures'])})")
