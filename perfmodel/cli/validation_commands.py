"""Commands that measure: calibrate (this machine -> hardware YAML) and validate (engine vs cost model)."""

from __future__ import annotations

from pathlib import Path

import typer

from perfmodel.cli.app import app
from perfmodel.cli.options import name_list
from perfmodel.errors import PerfmodelError, bad_value
from perfmodel.output import check_format, console, emit, print_table, rows_to_csv, seconds


@app.command()
def calibrate(
    name: str = typer.Option(None, help="machine name (default: the host name); writes hardware/local-<name>.yaml"),
    out_dir: Path = typer.Option(Path("hardware"), help="folder for the YAML"),
    backends: str = typer.Option("numpy,torch", help="engine backends to profile"),
    quick: bool = typer.Option(False, help="fewer matmul shapes"),
    fit_engine: bool = typer.Option(True, "--fit-engine/--no-fit-engine",
                                    help="fit per-operator-kind efficiencies from the engine's own operators"),
    format: str = typer.Option("table", "--format", help="table | json | csv"),
) -> None:
    """Measure this machine (matmul FLOP/s by shape, bandwidth, caches, dispatch overheads) into a hardware YAML."""
    from rich.progress import Progress

    from perfmodel.validation.calibrate import calibrate as run

    check_format(format)
    bes = tuple(name_list(backends))
    if not bes:
        raise bad_value("--backends", backends, "numpy,torch")
    for b in bes:
        if b not in ("numpy", "torch"):
            raise bad_value("--backends", b, "numpy,torch")
    _check_calibration_target(out_dir, name)
    with Progress(transient=True, disable=format != "table") as prog:
        task = prog.add_task("calibrating", total=None)
        path, d = run(out_dir, name, bes, progress=lambda s: prog.update(task, description=f"calibrating: {s}"),
                      quick=quick, fit_engine=fit_engine)
    summary = {"path": str(path), "name": d["name"], "description": d["description"],
               "peak_tflops": d["peak_tflops"], "bandwidth_gbps": d["memory"]["bandwidth_gbps"],
               "efficiency": d["efficiency"], "engines": d["engines"]}
    if emit(format, summary, [{"name": d["name"], "path": str(path), **{f"{k}_tflops": v for k, v in
                                                                      d["peak_tflops"].items()},
                               "bandwidth_gbps": d["memory"]["bandwidth_gbps"]}]):
        return
    c = console()
    c.print(f"wrote [bold]{path}[/bold]: {d['description']}")
    c.print(f"peaks (TFLOP/s): {d['peak_tflops']}; read bandwidth {d['memory']['bandwidth_gbps']} GB/s; "
            f"matmul half-efficiency dimension {d['efficiency']['matmul_half_dim']}")
    for be, prof in d["engines"].items():
        c.print(f"  {be}: overhead µs {prof['efficiency'].get('kind_overhead_us')}")


CALIBRATED_HEADER = "# Written by `perfmodel calibrate`"


def _check_calibration_target(out_dir: Path, name: str | None) -> Path:
    """The YAML calibrate will write (out_dir/local-<name>.yaml) must be a plain name in out_dir and may
    replace only a file an earlier calibrate wrote (its first line says so): a library hardware YAML, or one
    written by hand, is never overwritten."""
    import socket

    from perfmodel.cli.options import plain_name

    if name is not None:
        plain_name("--name", name)
    host = name or socket.gethostname().split(".")[0].lower() or "machine"
    target = Path(out_dir) / f"local-{host}.yaml"
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise PerfmodelError(f"calibrate: {target}: exists and is not a plain file; pass another --name")
    if target.is_file():
        try:
            with open(target, encoding="utf-8", errors="replace") as f:
                first = f.readline()
        except OSError as e:
            raise PerfmodelError(f"calibrate: {target}: {e.strerror or e}") from None
        if not first.startswith(CALIBRATED_HEADER):
            raise PerfmodelError(f"calibrate: {target} exists and was not written by calibrate; it is never "
                                 "overwritten (pass another --name or --out-dir)")
    return target


@app.command()
def validate(
    hardware: str = typer.Option(None, help="calibrated hardware YAML or name (default: the newest "
                                            "hardware/local-*.yaml)"),
    grid: str = typer.Option("default", help="default (deployment-like, >= 40 points) | numpy | tiny"),
    backend: str = typer.Option(None, help="only cases of this backend"),
    repeats: int = typer.Option(3, help="timed repeats per point (after one warm-up)"),
    measurements: Path = typer.Option(None, help="validate measurements of another engine instead (CSV, "
                                                 "llama-bench table, vLLM JSON), or 'builtin': the published "
                                                 "measurements set (perfmodel/data/measurements.csv)"),
    model: str = typer.Option(None, help="with --measurements: model when the file does not say"),
    batch: int = typer.Option(None), input: int = typer.Option(None, "--input"), output: int = typer.Option(None),
    fit: bool = typer.Option(False, "--fit", help="with --measurements: fit compute and memory efficiency; on the "
                                                  "published schema, write each framework's fitted numbers to YAML"),
    framework: str = typer.Option(None, "--framework", help="with --measurements in the published schema: only "
                                                           "this framework (vllm, tensorrt-llm, llama.cpp, ...)"),
    out_dir: Path = typer.Option(None, help="report folder (default: reports/validation-<machine>)"),
    speed_reference: bool = typer.Option(True, "--speed-reference/--no-speed-reference",
                                         help="time calibrate's reference step beside every point and rescale "
                                              "the point to the calibrated speed (a shared VM drifts)"),
    format: str = typer.Option("table", "--format", help="table | json | csv"),
) -> None:
    """Hold the cost model against the reference engine: exact counts (non-zero exit on any difference) and
    predicted vs measured time per operator and phase, with a CSV and plots under reports/."""
    from perfmodel.specs import load_hardware

    check_format(format)
    if measurements is not None:
        from perfmodel.validation.measurements import is_published_csv

        if is_published_csv(measurements):
            _validate_published(measurements, framework, fit, out_dir, format)
        else:
            _validate_measurements(measurements, hardware, model, batch, input, output, fit, format)
        return
    from rich.progress import Progress

    from perfmodel.validation import plots
    from perfmodel.validation.validate import GRIDS, Runner, error_summary

    if grid not in GRIDS:
        raise bad_value("--grid", grid, "|".join(GRIDS))
    if repeats < 1:
        raise bad_value("--repeats", repeats, "an integer >= 1")
    if backend is not None and backend not in ("numpy", "torch"):
        raise bad_value("--backend", backend, "numpy|torch")
    hw = load_hardware(hardware) if hardware else _newest_local()
    cases = [c for c in GRIDS[grid] if backend is None or c.backend == backend]
    if not _has_torch():
        cases = [c for c in cases if c.backend != "torch"]
    n_points = sum(len(c.points()) for c in cases)
    runner = Runner(cases, hw, normalise=speed_reference)
    with Progress(transient=True, disable=format != "table") as prog:
        task = prog.add_task("validating", total=n_points * (1 + repeats + min(repeats, 2)))
        results = runner.measure(repeats, min(repeats, 2),
                                 progress=lambda s: (prog.update(task, description=f"validating: {s}"),
                                                     prog.advance(task)))
    op_rows = [r for res in results for r in res.op_rows]
    phase_rows = [r for res in results for r in res.phase_rows]
    mismatches = [m for res in results for m in res.mismatches]
    import pandas as pd

    out = out_dir or Path("reports") / f"validation-{hw.name}"
    from perfmodel.output import atomic_write

    atomic_write(out / "operators.csv", lambda p: pd.DataFrame(op_rows).to_csv(p, index=False))
    atomic_write(out / "phases.csv", lambda p: pd.DataFrame(phase_rows).to_csv(p, index=False))
    by_phase = error_summary(phase_rows, "phase")
    by_kind = error_summary(op_rows, "kind")
    by_op = error_summary(op_rows, "op")
    by_exec = error_summary([{**r, "exec_phase": f"{r['backend']}/{r['exec']} {r['phase']}"} for r in phase_rows],
                            "exec_phase")
    terms = _overhead_terms(phase_rows)
    title = f"cost model vs reference engine on {hw.name} ({grid} grid)"
    plots.scatter(op_rows, phase_rows, out / "predicted_vs_measured.png", title)
    if op_rows:
        plots.error_by_operator(by_op, out / "error_by_operator.png", "time error by operator")
        first = next(c for c in cases if c.compiled is None)
        plots.roofline(hw.for_engine(first.backend), op_rows, out / "roofline_measured.png",
                       f"engine operators on {hw.name}: measured vs predicted")
    # the same points at the speed each was timed at, for comparison with the rescaled figures
    raw_phase = error_summary([{**r, "measured_s": r["measured_raw_s"], "noise_pct": r["noise_raw_pct"]}
                               for r in phase_rows], "phase")
    result = {"hardware": hw.name, "grid": grid, "cases": len(cases), "points": n_points,
              "count_mismatches": mismatches, "phase_error": by_phase, "phase_error_unscaled": raw_phase,
              "speed": runner.speed, "exec_error": by_exec,
              "kind_error": by_kind, "operator_error": by_op, "overhead_terms": terms, "report": str(out)}
    if format == "json":
        emit("json", result)
    elif format == "csv":
        print(rows_to_csv(phase_rows), end="")
    else:
        pct = lambda v: f"{v:.1f} %"  # noqa: E731
        cols = lambda k: {k: (k, str), "n": ("n", str), "median_ape_pct": ("median |err|", pct),  # noqa: E731
                          "p90_ape_pct": ("p90", pct), "max_ape_pct": ("max", pct), "bias_pct": ("bias", pct),
                          **({"noise_pct": ("noise", pct)} if k != "kind" else {})}
        print_table(phase_rows, title=title, columns={
            "case": ("case", str), "phase": ("phase", str), "context": ("context", str),
            "measured_s": ("measured", seconds), "predicted_s": ("predicted", seconds),
            "noise_pct": ("noise", lambda v: f"{v:.1f} %")})
        print_table(by_phase, title="time error per phase (noise: median relative spread of the repeats)",
                    columns=cols("phase"))
        if runner.speed:
            print_table(raw_phase, title="the same, at the speed each point was timed at (not rescaled)",
                        columns=cols("phase"))
            console().print("machine speed against calibration (reference step): " + ", ".join(
                f"{b} ×{v['factor']:.3f} (spread {v['spread_pct']:.0f} %)" for b, v in runner.speed.items()))
        print_table(by_exec, title="per backend, execution mode and phase", columns=cols("exec_phase"))
        if by_kind:
            print_table(by_kind, title="operator time error per kind", columns=cols("kind"))
        print_table(terms, title="what each term explains (share of the measured phase time, median over points)",
                    columns={k: (k, (lambda v: f"{v:.1f} %") if k != "phase" else str) for k in terms[0]}
                    if terms else None)
        c = console()
        if mismatches:
            c.print(f"[red]{len(mismatches)} count mismatches[/red] (FLOPs/bytes must be equal exactly):")
            for m in mismatches[:20]:
                c.print("  " + m)
        else:
            c.print(f"[green]counts: engine FLOPs, bytes and KV bytes equal the cost model exactly[/green] "
                    f"({len(op_rows)} operator points)")
        c.print(f"report: {out}/ (operators.csv, phases.csv, predicted_vs_measured.png, error_by_operator.png, "
                f"roofline_measured.png)")
    if mismatches:
        raise typer.Exit(1)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _overhead_terms(phase_rows: list[dict]) -> list[dict]:
    """Per phase, the median share of the measured wall time that each named term takes: measured (the
    traced operators, the glue between them, the tracer's own cost) and predicted (roofline, per-operator
    dispatch, host glue or graph launch)."""
    import statistics

    out = []
    for phase in ("prefill", "decode"):
        rs = [r for r in phase_rows if r["phase"] == phase and r["measured_s"] > 0]
        if not rs:
            continue
        share = lambda k: statistics.median(r[k] / r["measured_s"] * 100 for r in rs if k in r)  # noqa: E731
        row = {"phase": phase}
        for k, label in (("measured_ops_s", "measured operators"), ("measured_glue_s", "measured glue"),
                         ("tracer_s", "tracer cost"), ("pred_roofline_s", "predicted roofline"),
                         ("pred_dispatch_s", "predicted dispatch"), ("pred_glue_s", "predicted glue/launch")):
            if any(k in r for r in rs):
                row[label] = share(k)
        out.append(row)
    return out


def _newest_local():
    from perfmodel.specs.hardware import hardware_dirs, load_hardware_file

    found = sorted((p for d in hardware_dirs() for p in d.glob("local-*.yaml")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise PerfmodelError("--hardware: no calibrated machine found; run `perfmodel calibrate` first or pass "
                             "--hardware NAME")
    return load_hardware_file(found[-1])


def _validate_measurements(path, hardware, model, batch, input, output, fit, format):
    from perfmodel.specs import load_hardware
    from perfmodel.validation.measurements import errors, fit_efficiency, predict, read_measurements

    df = read_measurements(path, {"model": model, "hardware": hardware, "batch": batch, "input": input,
                                  "output": output})
    pred = predict(df)
    before = errors(pred)
    result = {"rows": len(df), "error": before}
    if fit:
        hws = df["hardware"].unique()
        if len(hws) != 1:
            raise PerfmodelError("--fit: the measurements must come from one hardware")
        fitted, _ = fit_efficiency(df, load_hardware(hws[0]))
        after = errors(predict(df, fitted))
        result.update(fitted={"compute": fitted.efficiency.compute, "memory": fitted.efficiency.memory},
                      error_after_fit=after)
    if emit(format, result, pred.to_dict(orient="records")):
        return
    pct = lambda v: f"{v:.1f} %"  # noqa: E731
    cols = {"metric": ("metric", str), "n": ("n", str), "median_ape_pct": ("median |err|", pct),
            "p90_ape_pct": ("p90", pct), "max_ape_pct": ("max", pct)}
    print_table(before, title=f"{path.name}: {len(df)} measured runs, predicted with the library hardware",
                columns=cols)
    if fit:
        console().print(f"fitted efficiency: compute {result['fitted']['compute']:.3f}, memory "
                        f"{result['fitted']['memory']:.3f}")
        print_table(result["error_after_fit"], title="after the fit", columns=cols)


def _validate_published(path, framework, fit, out_dir, format):
    """Published measurements: every row predicted (or listed with why not), the error per framework and metric
    before fitting, then a fit per framework on one half of a split by source, reported on the other half."""
    from rich.progress import Progress

    from perfmodel.validation import measurements as pm

    df = pm.read_published(path)
    label = "builtin (perfmodel/data/measurements.csv)" if str(path) == "builtin" else str(path)
    if framework is not None:
        known = sorted(df["framework"].unique())
        if framework not in known:
            raise bad_value("--framework", framework, "|".join(known))
        df = df[df["framework"] == framework].reset_index(drop=True)
    with Progress(transient=True, disable=format != "table") as prog:
        task = prog.add_task("predicting the published rows", total=len(df))
        evals, unexpressed = pm.evaluate_published(df, progress=lambda: prog.advance(task))
        prog.update(task, description="fitting on the half 'fit', scoring the held-out half")
        rep = pm.holdout_report(evals, df)
    written = []
    if fit:
        for fw, fitted in rep["fitted"].items():
            dest = (out_dir or Path("reports")) / f"framework-fit-{fw}.yaml"
            written.append(str(pm.write_profile(dest, fitted, rep, label)))
    half = rep["split"]
    rows = [{"row": r.e.row, "framework": r.framework, "half": half[r.source], "hardware": r.e.hw.name,
             "model": r.e.model.name, "metric": r.e.metric, "measured": r.e.measured, "nominal": r.nominal,
             "fitted": r.predict(rep["fitted"][r.framework]) if r.framework in rep["fitted"] else None,
             "roofline": r.roofline, "source": r.source} for r in evals]
    result = {"measurements": label, "rows": len(df), "predicted": len(evals), "not_expressible": unexpressed,
              "error_before_fit": rep["before_all"], "heldout_before_fit": rep["before_heldout"],
              "heldout_after_fit": rep["after_heldout"], "fit_half_after_fit": rep["after_fit_half"],
              "fitted": rep["fitted"], "split": half, "profiles": written}
    if emit(format, result, rows):
        return
    pct = lambda v: f"{v:.1f} %"  # noqa: E731
    sgn = lambda v: f"{v:+.1f} %"  # noqa: E731
    c = console()
    c.print(f"{label}: {len(df)} rows, {len(evals)} predicted, {len(unexpressed)} not expressible (listed below)")
    print_table(rep["before_all"], title="error before fitting (library hardware, nominal efficiency), all rows",
                columns={"framework": ("framework", str), "metric": ("metric", str), "n": ("n", str),
                         "median_abs_pct": ("median |err|", pct), "p90_abs_pct": ("p90", pct),
                         "bias_pct": ("bias", sgn)})
    after = {(r["framework"], r["metric"]): r for r in rep["after_heldout"]}
    held = [{**b, **{f"{k}_after": after.get((b["framework"], b["metric"]), {}).get(k, float("nan"))
                     for k in ("median_abs_pct", "p90_abs_pct", "bias_pct")}} for b in rep["before_heldout"]]
    print_table(held, title=f"held-out half ({rep['n_heldout']} rows; fitted on {rep['n_fit']} rows of other "
                            "sources): before -> after the fit",
                columns={"framework": ("framework", str), "metric": ("metric", str), "n": ("n", str),
                         "median_abs_pct": ("median before", pct), "median_abs_pct_after": ("after", pct),
                         "p90_abs_pct": ("p90 before", pct), "p90_abs_pct_after": ("after", pct),
                         "bias_pct": ("bias before", sgn), "bias_pct_after": ("after", sgn)})
    keys = list(pm.DEFAULT_PARAMS)
    print_table([{"framework": fw, **{k: p[k] for k in keys}, "n": p["provenance"]["n"]}
                 for fw, p in rep["fitted"].items()], title="fitted numbers (fit half)",
                columns={"framework": ("framework", str), **{k: (k.replace("_", " "), lambda v: f"{v:.4g}")
                                                                for k in keys}, "n": ("rows", str)})
    levels = [{"framework": fw, "level": lv, "key": k, "compute": t["compute"], "memory": t["memory"]}
              for fw, p in rep["fitted"].items() for lv in pm.LEVELS for k, t in p[f"{lv}_efficiency"].items()]
    if levels:
        print_table(levels, title="per hardware family and machine: multipliers on the framework-wide ones",
                    columns={"framework": ("framework", str), "level": ("level", str), "key": ("key", str),
                             "compute": ("compute", lambda v: f"{v:.3g}"), "memory": ("memory", lambda v: f"{v:.3g}")})
    by_reason: dict[str, list[int]] = {}
    for u in unexpressed:
        by_reason.setdefault(u["reason"], []).append(u["row"])
    print_table([{"reason": k, "n": len(v), "rows": " ".join(map(str, v))} for k, v in by_reason.items()],
                title="rows the cost model cannot express (line numbers in the CSV)",
                columns={"reason": ("reason", str), "n": ("n", str), "rows": ("rows", str)})
    for w in written:
        c.print(f"wrote [bold]{w}[/bold]")
