"""serve-bench: a real serving loop on the reference engine, measured against the simulator on the same requests."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from perfmodel.cli.app import app
from perfmodel.errors import PerfmodelError
from perfmodel.output import check_format, console, emit, print_table, seconds

# (key, label, path into the result) of every figure compared; latencies in seconds
FIGURES = [(f"{m}_{q}", f"{m.upper()} {q}", (f"{m}_s", q)) for m in ("ttft", "tpot", "e2e") for q in ("p50", "p90", "p99")]
FIGURES += [("throughput", "throughput tok/s", ("throughput_output_tokens_per_s",)),
            ("requests_per_s", "requests/s", ("throughput_requests_per_s",)),
            ("goodput", "goodput req/s", ("goodput_requests_per_s",)),
            ("prefix_hit_rate", "prefix hit rate", ("prefix_hit_rate",))]


def _get(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return float(d)


def compare(measured: dict, simulated: dict) -> dict:
    """Signed error of the simulation, in % of the measured value (+: the simulator predicts more)."""
    out = {}
    for key, _, path in FIGURES:
        m, s = _get(measured, path), _get(simulated, path)
        out[key] = 0.0 if m == s else (100.0 * (s - m) / m if m else float("inf"))
    return out


def _records(path, flag: str) -> dict:
    """A records file of an earlier serve-bench run (--records), checked for what replay and fits read."""
    p = Path(path)
    if not p.is_file():
        raise PerfmodelError(f"{flag}: {path} not found")
    try:
        rec = json.loads(p.read_text())
        rec["steps"], rec["requests"], rec["stats"], rec["config"]  # noqa: B018
        w = rec["workload"]
        w["arrival_s"], w["input_tokens"], w["output_tokens"], w["prefix_tokens"], w["model"], w["backend"]  # noqa: B018
    except (ValueError, KeyError, TypeError):
        raise PerfmodelError(f"{flag}: {path} is not a serve-bench records file (write one with --records)") from None
    return rec


def _local_hardware() -> str:
    import socket

    return f"local-{socket.gethostname().split('.')[0].lower()}"


@app.command("serve-bench")
def serve_bench(
    model: str = typer.Option("smollm2-135m", help="smollm2-135m (real weights) or an engine model"),
    layers: int = typer.Option(None, help="run only the first N layers"),
    backend: str = typer.Option("torch", help="numpy | torch"),
    flash: bool = typer.Option(True, "--flash/--no-flash", help="SDPA attention (torch backend)"),
    threads: int = typer.Option(2, help="CPU threads of the engine"),
    rate: float = typer.Option(1.0, help="Poisson arrivals per second"),
    requests: int = typer.Option(40, help="requests to serve"),
    input: str = typer.Option("uniform:64:256", "--input", help="prompt tokens: N, uniform:LO:HI, normal:MEAN:STD "
                                                                "or lognormal:MEDIAN:SIGMA"),
    output: str = typer.Option("24", help="output tokens (run to this length, EOS ignored)"),
    trace: Path = typer.Option(None, help="CSV trace instead of Poisson arrivals"),
    kv_blocks: int = typer.Option(256, help="KV blocks of the pool"),
    block_tokens: int = typer.Option(16, help="tokens per KV block"),
    chunked_prefill: int = typer.Option(0, help="prefill token budget per step (0: whole prompts)"),
    max_batch: int = typer.Option(64, help="most sequences per step"),
    prefix_cache: bool = typer.Option(False, "--prefix-cache/--no-prefix-cache", help="reuse full prefix blocks"),
    shared_prefix: int = typer.Option(0, help="tokens of a system prompt in front of every prompt"),
    hardware: str = typer.Option(None, help="hardware for the simulation (default: local-<host>, from calibrate)"),
    ttft: float = typer.Option(None, help="TTFT SLO for goodput"), tpot: float = typer.Option(None),
    seed: int = typer.Option(0),
    records: Path = typer.Option(None, help="write the real loop's records (JSON) here"),
    replay: Path = typer.Option(None, help="simulate against the records of an earlier run instead of serving"),
    fit_steps: str = typer.Option(None, help="records of other runs (comma-separated JSON paths): fit the matmul "
                                             "terms of the hardware to their steps (perfmodel.serving.fit) first"),
    speed_reference: bool = typer.Option(True, "--speed-reference/--no-speed-reference",
                                     help="time calibrate's reference step before and after the run and simulate "
                                          "at the machine's speed now (a shared VM drifts)"),
    format: str = typer.Option("table", "--format", help="table | json | csv"),
) -> None:
    """Serve Poisson (or trace) requests with the reference engine in real time, then simulate the same
    requests; measured vs simulated TTFT/TPOT/E2E percentiles, throughput, goodput, prefix hit rate."""
    import dataclasses

    import numpy as np

    from perfmodel.costmodel.operators import Precision
    from perfmodel.planning.deploy import Deployment
    from perfmodel.planning.simulate import SchedulerConfig, simulate
    from perfmodel.planning.workload import LengthDist, Requests, poisson_requests, trace_requests
    from perfmodel.serving.bench import ServeConfig, metrics
    from perfmodel.specs import load_hardware

    check_format(format)
    hw_name = hardware or _local_hardware()
    try:
        hw = load_hardware(hw_name)
    except PerfmodelError:
        if hardware:
            raise
        raise PerfmodelError(f"--hardware: {hw_name} not found; run `perfmodel calibrate` on this machine first "
                             "(or pass --hardware)") from None
    # read before serving: a bad file must not cost a minutes-long real run first
    fit_records = [(f, _records(f, "--fit-steps")) for f in (x.strip() for x in (fit_steps or "").split(",")) if f]
    if replay is not None:
        rec = _records(replay, "--replay")
        cfg = ServeConfig(**rec["config"])
        w = rec["workload"]
        reqs = Requests(np.asarray(w["arrival_s"]), np.asarray(w["input_tokens"]), np.asarray(w["output_tokens"]),
                        np.asarray(w["prefix_tokens"]))
        backend, dtype, flash, model, layers = w["backend"], w["dtype"], w["flash"], w["model"], w.get("layers")
    else:
        cfg = ServeConfig(kv_blocks, block_tokens, chunked_prefill, max_batch, prefix_cache)
        SchedulerConfig(max_batch, block_tokens, chunked_prefill, kv_blocks, prefix_cache)  # validates the fields
    fit_train = []
    for f, train in fit_records:
        tw = train.get("workload", {})
        if (tw.get("model"), tw.get("backend"), tw.get("layers")) != (model, backend, layers):
            raise PerfmodelError(f"--fit-steps: {f} was measured with another model, depth or backend")
        fit_train += train["steps"]
    if replay is None:
        reqs = trace_requests(trace) if trace else poisson_requests(
            rate, requests, LengthDist.parse("--input", input), LengthDist.parse("--output", output), seed)
        reqs = reqs.with_shared_prefix(shared_prefix) if shared_prefix else reqs.with_shared_prefix(0)
        rec = _serve(model, layers, backend, flash, threads, reqs, cfg, seed, speed_reference)
        dtype = "fp32"
        rec["config"] = dataclasses.asdict(cfg)
        rec["workload"] = {"model": model, "layers": layers, "backend": backend, "dtype": dtype, "flash": flash,
                           "rate": None if trace else rate, "input": input, "output": output,
                           "arrival_s": reqs.arrival_s.tolist(), "input_tokens": reqs.input_tokens.tolist(),
                           "output_tokens": reqs.output_tokens.tolist(), "prefix_tokens": reqs.shared_prefix().tolist()}
        if records is not None:
            from perfmodel.output import atomic_write

            atomic_write(Path(records), lambda p: p.write_text(json.dumps(rec)))
    measured = metrics(rec, ttft, tpot)
    spec = _engine_spec(model, layers)
    engine_hw = dataclasses.replace(hw.for_engine(backend), host_overhead_us=measured["host_overhead_per_step_s"] * 1e6)
    dep = Deployment(spec, engine_hw, precision=Precision(dtype, dtype, dtype), flash=flash and backend == "torch",
                     exec_mode="eager")
    # the machine's speed now against calibrate's: the reference steps timed around this run
    from perfmodel.validation.reference import compute_speed_factor, speed_factor

    factor = speed_factor(engine_hw, backend, rec.get("reference_step_s") or [])
    compute_factor = compute_speed_factor(engine_hw, backend, rec.get("reference_matmul_s") or [])
    fit = None
    if fit_steps is not None:
        from perfmodel.serving.fit import fit_terms, step_errors

        fitted, fit = fit_terms(dep, fit_train)
        fit["records"] = fit_steps
        fit["this_run_before"] = step_errors(dep, rec["steps"])
        dep = dataclasses.replace(dep, hardware=fitted)
        fit["this_run_after"] = step_errors(dep, rec["steps"])
    sched_cfg = SchedulerConfig(cfg.max_batch, cfg.block_tokens, cfg.chunked_prefill, cfg.kv_blocks, cfg.prefix_cache)
    calibrated = None
    if factor is not None and fit is None:
        calibrated = simulate(dep, reqs, sched_cfg, ttft, tpot)
        dep = dataclasses.replace(dep, hardware=dep.hardware.slowed(factor, compute_factor))
    simulated = simulate(dep, reqs, sched_cfg, ttft, tpot)
    err = compare(measured, simulated)
    sat = _saturation(dep, reqs, cfg)
    if sat is not None and rec["workload"].get("rate"):
        sat["utilisation_at_rate"] = rec["workload"]["rate"] / sat["rate_rps"]
    result = {"measured": measured, "simulated": simulated, "error_pct": err, "hardware": hw.name, "fit": fit,
              "speed_factor": factor if fit is None else None,
              "compute_speed_factor": compute_factor if fit is None else None,
              "simulated_calibrated": calibrated,
              "error_pct_calibrated": compare(measured, calibrated) if calibrated is not None else None,
              "saturation": sat,
              "host_overhead_us": measured["host_overhead_per_step_s"] * 1e6,
              "workload": {"requests": len(reqs), "rate": rec["workload"].get("rate"),
                           "input": rec["workload"].get("input", input), "output": rec["workload"].get("output", output), "shared_prefix": int(reqs.shared_prefix().max()), **dataclasses.asdict(cfg)}}
    rows = [{"metric": label, "measured": _get(measured, path), "simulated": _get(simulated, path),
             "error_pct": err[key]} for key, label, path in FIGURES]
    if emit(format, result, rows):
        return
    fmt = lambda key, v: (f"{v * 100:.1f} %" if key == "prefix_hit_rate" else  # noqa: E731
                          seconds(v) if key.split("_")[0] in ("ttft", "tpot", "e2e") else f"{v:,.2f}")
    keyed = {label: key for key, label, _ in FIGURES}
    print_table([{**r, "measured": fmt(keyed[r["metric"]], r["measured"]),
                  "simulated": fmt(keyed[r["metric"]], r["simulated"]), "error_pct": f"{r['error_pct']:+.1f} %"}
                 for r in rows], title=f"{spec.name} served on this machine vs simulated on {hw.name}: "
                                       f"{len(reqs)} requests", columns={
        "metric": ("figure", str), "measured": ("measured", str), "simulated": ("simulated", str),
        "error_pct": ("error", str)})
    if sat is not None:
        console().print(f"predicted saturation {sat['rate_rps']:.3f} requests/s (closed form, bound: {sat['bound']})"
                        + (f"; utilisation ρ = {sat['utilisation_at_rate']:.2f} at the offered rate"
                           if "utilisation_at_rate" in sat else ""))
    if calibrated is not None:
        console().print(f"machine {factor:.3f}x slower than at calibration (reference step timed before and after "
                        f"the run); simulated at that speed. At the calibrated speed: " + ", ".join(
                            f"{k} {v:+.1f} %" for k, v in result["error_pct_calibrated"].items()
                            if k in ("ttft_p50", "tpot_p50", "throughput")))
    if fit is not None:
        console().print(f"fitted on {fit['steps']} steps of {fit['records']}: " + ", ".join(
            f"{k} ×{v:.3g}" for k, v in fit["terms"].items()) + f"; this run's step error (median) "
            f"{fit['this_run_before']['median_abs_error_pct']:.1f} % → {fit['this_run_after']['median_abs_error_pct']:.1f} %")
    console().print(f"{measured['iterations']} steps; host time outside the forward {seconds(measured['host_overhead_per_step_s'])}"
                    f"/step (forward {seconds(measured['forward_per_step_s'])}); {measured['preemptions']} preemptions "
                    f"measured, {simulated['preemptions']} simulated")


def _saturation(dep, reqs, cfg) -> dict | None:
    """The closed-form saturation rate of this deployment for the workload's lengths (planning.saturation),
    where that module is present."""
    own = reqs.input_tokens - (reqs.shared_prefix() if cfg.prefix_cache else 0)  # a cached prefix costs no prefill
    try:
        from perfmodel.planning.saturation import saturation
    except ImportError:
        from perfmodel.planning.simulate import StepCosts
        from perfmodel.serving.capacity import saturation_rate

        return saturation_rate(StepCosts(dep), own, reqs.output_tokens, cfg.max_batch, cfg.kv_blocks, cfg.block_tokens)
    try:
        r = saturation(dep, own, reqs.output_tokens, max_batch=cfg.max_batch, kv_blocks=cfg.kv_blocks,
                       block_tokens=cfg.block_tokens)
    except TypeError:  # another signature than the one this was written against: the serving closed form
        from perfmodel.planning.simulate import StepCosts
        from perfmodel.serving.capacity import saturation_rate

        return saturation_rate(StepCosts(dep), own, reqs.output_tokens, cfg.max_batch, cfg.kv_blocks, cfg.block_tokens)
    return {**{k: v for k, v in r.items() if isinstance(v, (int, float, str))}, "source": "perfmodel.planning.saturation"}


def _engine_spec(model: str, layers: int | None):
    from perfmodel.engine.loading import REAL_WEIGHTS
    from perfmodel.specs import load_model

    spec = load_model(model if model.lower() not in REAL_WEIGHTS else model.lower())
    return spec.replace(num_layers=layers) if layers else spec


def _serve(model, layers, backend, flash, threads, reqs, cfg, seed, speed_reference: bool = False) -> dict:
    import numpy as np

    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.transformer import Transformer
    from perfmodel.serving.bench import corpus_tokens, make_prompts, serve

    if threads < 1:
        raise PerfmodelError(f"--threads: must be an integer >= 1, got {threads}")
    be = make_backend(backend)
    if backend == "torch":
        be.torch.set_num_threads(threads)
    spec, weights, tok = load_engine_model(model, layers, seed)
    if tok is not None:
        prompts = make_prompts(corpus_tokens(tok), reqs, seed)
    else:  # random weights: random token ids stand in for text
        rng = np.random.default_rng(seed)
        corpus = rng.integers(0, spec.vocab_size, 50_000)
        prompts = make_prompts(corpus, reqs, seed)
    engine = Transformer(spec, weights, be, flash=flash and backend == "torch")
    if not speed_reference:
        return serve(engine, reqs, prompts, cfg)
    from perfmodel.validation.reference import Reference

    ref = Reference()
    before, before_c = ref.seconds(backend, calls=9), ref.matmul_seconds(backend, calls=9)
    rec = serve(engine, reqs, prompts, cfg)
    rec["reference_step_s"] = [before, ref.seconds(backend, calls=9)]
    rec["reference_matmul_s"] = [before_c, ref.matmul_seconds(backend, calls=9)]
    return rec
