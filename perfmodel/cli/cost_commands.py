"""Commands on the analytic cost model: analyze, models, hardware, sweep."""

from __future__ import annotations

from pathlib import Path

import typer

from perfmodel.cli.app import app
import numpy as np

from perfmodel.cli.options import DEFAULT_HARDWARE, DEFAULT_MODEL, int_axis, int_list, names
from perfmodel.cli.runtime_options import EXEC_OPT, FRAMEWORK_OPT, runtime, runtime_precision
from perfmodel.errors import PerfmodelError, bad_value
from perfmodel.output import check_format, console, emit, print_table, seconds, si

FORMAT_HELP = "table | json | csv"
PRINT_MAX = 100_000  # sweep points printed to stdout; larger grids go to --out
TABLE_ROWS = 200  # rows a sweep table shows


@app.command()
def analyze(
    model: str = typer.Option(DEFAULT_MODEL, help="library name, YAML or config.json path"),
    hardware: str = typer.Option(DEFAULT_HARDWARE, help="hardware name or YAML path"),
    batch: int = typer.Option(1, help="sequences processed together"),
    input: int = typer.Option(512, "--input", help="prompt tokens per sequence"),
    output: int = typer.Option(128, help="generated tokens per sequence"),
    dtype: str = typer.Option("bf16", help="activation (and default weight / KV) dtype"),
    weight_dtype: str = typer.Option(None, help="weights dtype (default: --dtype)"),
    kv_dtype: str = typer.Option(None, help="KV-cache dtype (default: --dtype)"),
    flash: bool = typer.Option(True, "--flash/--no-flash", help="FlashAttention (scores stay on chip)"),
    efficiency: str = typer.Option("nominal", help="nominal | optimistic | pessimistic efficiency factors"),
    kv_prune: str = typer.Option("dense", help="KV compression: per-token:0.7, per-channel:0.5:output, kivi:2, "
                                               "h2o:0.7, streaming:0.7"),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    tp: int = typer.Option(1, help="tensor-parallel devices"), pp: int = typer.Option(1, help="pipeline stages"),
    ep: int = typer.Option(1, help="expert-parallel devices (MoE)"),
    format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """Per-operator FLOPs, bytes, time and bound for prefill and decode, with the request summary (per device,
    collectives as operators, under --tp/--pp/--ep)."""
    from perfmodel.kvcache.methods import KVMethod
    from perfmodel.costmodel.operators import Precision
    from perfmodel.costmodel.request import Workload, analyze as run_analysis
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    precision = Precision(weight_dtype or dtype, dtype, kv_dtype or dtype)
    hw, mode, prof = runtime(load_hardware(hardware).with_efficiency(efficiency), exec, framework)
    precision = runtime_precision(precision, hw, prof)
    method = KVMethod.parse(kv_prune)
    from perfmodel.costmodel.parallel import Parallelism

    a = run_analysis(load_model(model), hw, Workload(batch, input, output), precision, flash,
                     None if method.kind == "dense" else method, exec_mode=mode,
                     parallelism=Parallelism(tp=tp, pp=pp, ep=ep))
    result = a.to_dict()
    result["framework"] = prof.name if prof else None
    if emit(format, result, result["ops"]):
        return
    _print_analysis(result)


def _print_analysis(r: dict) -> None:
    from perfmodel.output import console

    cols = {"phase": ("phase", str), "op": ("operator", str), "layers": ("×", str),
            "flops": ("FLOPs", lambda v: si(v)), "bytes": ("bytes", lambda v: si(v, "B")),
            "kv_bytes": ("KV bytes", lambda v: si(v, "B")),
            "arithmetic_intensity": ("FLOP/B", lambda v: f"{v:.1f}"),
            "time_s": ("time", seconds), "bound": ("bound", str)}
    w = r["workload"]
    run = f"{r['exec_mode']}" + (f", {r['framework']}" if r.get("framework") else "")
    par = r["parallelism"]
    if par["devices"] > 1:
        run += f", per device of TP{par['tp']}·PP{par['pp']}" + (f"·EP{par['ep']}" if par["ep"] > 1 else "")
    print_table(r["ops"], title=f"{r['model']} on {r['hardware']} ({run}): batch {w['batch']}, input {w['input']}, "
                                f"output {w['output']} (decode rows: totals over all steps)", columns=cols)
    phases = [{"phase": ph, **{k: r[ph][k] for k in ("flops", "bytes", "time_s", "bound")}}
              for ph in ("prefill", "decode")]
    print_table(phases, columns={"phase": ("phase", str), "flops": ("FLOPs", si), "bytes": ("bytes", lambda v: si(v, "B")),
                                 "time_s": ("time", seconds), "bound": ("bound", str)})
    q, m = r["request"], r["memory"]
    c = console()
    c.print(f"TTFT {seconds(q['ttft_s'])} · TPOT {seconds(q['tpot_first_s'])} → {seconds(q['tpot_last_s'])} "
            f"· end-to-end {seconds(q['e2e_s'])} · {q['tokens_per_s']:.1f} tokens/s")
    c.print(f"memory: weights {si(m['weights_bytes'], 'B')} + KV {si(m['kv_cache_bytes'], 'B')} "
            f"({si(m['kv_bytes_per_token'], 'B')}/token) + activations {si(m['activation_bytes'], 'B')} = "
            f"{si(m['total_bytes'], 'B')} of {si(m['capacity_bytes'], 'B')}"
            + (f" per device ({m['devices']} devices)" if m.get("per_device") else "") + ": "
            + ("[green]fits[/green]" if m["fits"] else "[red]does not fit[/red]"))


@app.command()
def models(format: str = typer.Option("table", "--format", help=FORMAT_HELP)) -> None:
    """The built-in model library with parameter counts."""
    from perfmodel.specs import list_models

    check_format(format)
    rows = [{"name": m.name, "family": m.family, "attention": m.attention_kind, "layers": m.num_layers,
             "hidden": m.hidden_size, "heads": m.num_heads, "kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
             "experts": f"{m.experts_per_token}/{m.num_experts}" if m.is_moe else "",
             "params": m.param_count(), "active_params": m.param_count(active=True),
             "published_params": m.published_params,
             "kv_bytes_per_token_bf16": m.kv_elements_per_token * 2} for m in list_models()]
    if emit(format, rows):
        return
    cols = {k: (k, str) for k in ("name", "family", "attention", "layers", "hidden", "heads", "kv_heads",
                                   "head_dim", "experts")}
    cols.update({"params": ("params", si), "active_params": ("active", si),
                 "kv_bytes_per_token_bf16": ("KV/token (bf16)", lambda v: si(v, "B", 1024))})
    print_table(rows, title="Model library", columns=cols)


@app.command("hardware")
def hardware_list(format: str = typer.Option("table", "--format", help=FORMAT_HELP)) -> None:
    """The hardware library (hardware/*.yaml) with its roofs."""
    from perfmodel.specs import list_hardware

    check_format(format)
    rows = [{"name": h.name, "description": h.description, "bf16_tflops": h.peak_tflops.get("bf16"),
             "fp8_tflops": h.peak_tflops.get("fp8"), "memory_gb": h.memory_capacity_gb,
             "bandwidth_gbps": h.memory_bandwidth_gbps,
             "ridge_flop_per_byte": round(h.peak_tflops.get("bf16", 0) * 1e3 / h.memory_bandwidth_gbps, 1),
             "interconnect": h.interconnect.name if h.interconnect else "",
             "price_per_hour_usd": h.price_per_hour_usd} for h in list_hardware()]
    if emit(format, rows):
        return
    show = lambda v: "" if v is None else str(v)  # noqa: E731
    print_table(rows, title="Hardware library", columns={k: (k, show) for k in rows[0]})


@app.command("sweep")
def sweep_cmd(
    model: str = typer.Option(DEFAULT_MODEL, help="comma-separated model names or paths"),
    hardware: str = typer.Option(DEFAULT_HARDWARE, help="comma-separated hardware names or paths"),
    batch: str = typer.Option("1,4,16,64", help="list 1,8,64 or range 1:64:8"),
    input: str = typer.Option("128,512,2048", "--input"),
    output: str = typer.Option("128,512", help="generated tokens"),
    dtype: str = typer.Option("bf16"),
    weight_dtype: str = typer.Option(None),
    kv_dtype: str = typer.Option(None),
    flash: bool = typer.Option(True, "--flash/--no-flash"),
    exec: str = EXEC_OPT, framework: str = FRAMEWORK_OPT,
    tp: str = typer.Option("1", help="tensor-parallel degrees, a list like 1,2,4,8 (a grid dimension)"),
    out: Path = typer.Option(None, help="write the grid to FILE.csv or FILE.parquet"),
    format: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """A vectorised grid of models × hardware × batch × input × output (request-level summary); any size with
    --out, streamed in chunks in bounded memory."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from perfmodel.costmodel.operators import Precision
    from perfmodel.costmodel.sweep import grid_points, iter_sweep
    from perfmodel.output import write_frames
    from perfmodel.specs import load_hardware, load_model

    check_format(format)
    if out is not None and out.suffix not in (".csv", ".parquet"):
        raise bad_value("--out", str(out), "a path ending in .csv or .parquet")
    if out is not None and out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PerfmodelError("--out: writing .parquet needs pyarrow (pip install 'perfmodel[parquet]'); "
                                 "use .csv") from None
    # axes within their rules; int32 halves an axis of up to 16 M values
    grid = [int_axis(f, t).astype(np.int32) for f, t in (("--batch", batch), ("--input", input), ("--output", output))]
    tps = tuple(int_list("--tp", tp))
    names_m, names_h = names("--model", model), names("--hardware", hardware)
    points = grid_points(len(names_m), len(names_h), tps, *grid)
    if out is None and points > PRINT_MAX:
        raise PerfmodelError(
            f"sweep: the grid has {points:,} points ({len(names_m)} model × {len(names_h)} hardware × {len(tps)} tp × "
            f"{len(grid[0]):,} batch × {len(grid[1]):,} input × {len(grid[2]):,} output); printing allows at most "
            f"{PRINT_MAX:,}: write it with --out FILE.csv (or FILE.parquet)")
    models_ = [load_model(x) for x in names_m]
    resolved = [runtime(load_hardware(x), exec, framework) for x in names_h]
    hws, mode = [r[0] for r in resolved], resolved[0][1]
    precision = runtime_precision(Precision(weight_dtype or dtype, dtype, kv_dtype or dtype), hws[0],
                                  resolved[0][2])
    from perfmodel.costmodel.parallel import Parallelism

    for m in models_:  # refuse a degree the model cannot split before any chunk runs
        for t in tps:
            Parallelism(tp=t).check(m)
    frames = iter_sweep(models_, hws, *grid, precision=precision, flash=flash, exec_mode=mode, tps=tps)
    shown: list = []  # the rows printed: all of a printable grid, else the first TABLE_ROWS

    limit = points if points <= PRINT_MAX else TABLE_ROWS

    def keep(stream):
        for df in stream:
            if len(shown) < limit:
                shown.extend(df.head(limit - len(shown)).to_dict(orient="records"))
            yield df

    t0 = time.perf_counter()
    # the bar goes to stderr (stdout may be the JSON/CSV) and only on a terminal
    bar = Console(stderr=True)
    with Progress(TextColumn("sweeping"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
                  TimeRemainingColumn(), transient=True, console=bar, disable=not bar.is_terminal) as prog:
        task = prog.add_task("sweep", total=points)
        advance = lambda n: prog.advance(task, n)  # noqa: E731
        if out is not None:
            write_frames(out, keep(frames), progress=advance)
        else:
            for df in keep(frames):
                advance(len(df))
    dt = time.perf_counter() - t0
    if points > PRINT_MAX:  # written to --out only: say where, how many, how fast
        summary = {"out": str(out), "points": points, "seconds": round(dt, 3), "points_per_s": round(points / dt)}
        if emit(format, summary, [summary]):
            return
        console().print(f"wrote {points:,} points to {out} in {dt:.1f} s ({points / dt:,.0f} points/s)")
    elif emit(format, shown):
        return
    cols = {"model": ("model", str), "hardware": ("hardware", str), "batch": ("batch", lambda v: f"{v:g}"),
            "input": ("input", lambda v: f"{v:g}"), "output": ("output", lambda v: f"{v:g}"),
            "ttft_s": ("TTFT", seconds), "tpot_s": ("TPOT", seconds), "e2e_s": ("e2e", seconds),
            "tokens_per_s": ("tokens/s", lambda v: f"{v:,.0f}"), "memory_bytes": ("memory", lambda v: si(v, "B")),
            "fits": ("fits", str)}
    first = f" (first {TABLE_ROWS}" + (f"; all in {out})" if out else ")") if points > TABLE_ROWS else ""
    print_table(shown[:TABLE_ROWS], title=f"sweep: {points:,} points{first}", columns=cols)


@app.command("frameworks")
def frameworks_list(format: str = typer.Option("table", "--format", help=FORMAT_HELP)) -> None:
    """Serving-framework profiles (perfmodel/frameworks/*.yaml): execution mode, host overhead, formats."""
    from perfmodel.frameworks import list_frameworks

    check_format(format)
    rows = [{"name": f.name, "version": f.version, "exec": f.exec_mode,
             "host_overhead_us": f.host_overhead_us.get("default", 0.0), "kv_block_tokens": f.kv_block_tokens,
             "weight_formats": ",".join(f.weight_formats), "native_compute": ",".join(f.native_compute),
             "efficiency": "fitted" if str(f.provenance.get("efficiency", "")).lower().startswith("fitted")
             else "unfitted"}
            for f in list_frameworks()]
    if emit(format, [f.to_dict() for f in list_frameworks()] if format == "json" else rows, rows):
        return
    print_table(rows, title="Framework profiles", columns={k: (k, str) for k in rows[0]})
