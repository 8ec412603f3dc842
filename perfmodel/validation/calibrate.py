"""`perfmodel calibrate`: measure this machine and write a hardware YAML the cost model can use.

What is measured, and how it enters the model (a few interpretable numbers, no black box):
- matmul FLOP/s per dtype over square and skinny shapes -> peak_tflops (the best achieved) and
  matmul_half_dim h, the smallest-dimension scale at which a matmul reaches half its peak: eff = d / (d + h);
- streaming read bandwidth (a large sum, perfmodel.engine.membw) -> memory bandwidth; an elementwise add's bandwidth -> the
  elementwise_memory fraction;
- the engine's own softmax on cache-resident data -> vector_tflops (elementwise FLOP rate);
- each engine backend's operators on tiny tensors -> kind_overhead_us, the dispatch cost per operator kind;
- cache sizes from /sys, memory capacity from /proc/meminfo.
On an NVIDIA GPU, pynvml names the device, the matching datasheet YAML is the roof, and the matmul and
bandwidth measurements run on the GPU through PyTorch.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np

SQUARE = (64, 128, 256, 512, 1024, 1536)
SKINNY_M = (1, 4, 16, 64, 256)
SKINNY_KN = 1024


def _best_time(fn, repeats=5, min_time=0.02) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def matmul_points(backend, dtype: str, progress=None, square=SQUARE, skinny=SKINNY_M) -> list[dict]:
    """Achieved FLOP/s for square n^3 and skinny [m, K] x [K, N] matmuls."""
    from perfmodel.engine.backend import make_backend

    be = make_backend(backend, dtype)
    rng = np.random.default_rng(0)
    shapes = [(n, n, n) for n in square] + [(m, SKINNY_KN, SKINNY_KN) for m in skinny]
    out = []
    for m, k, n in shapes:
        a, b = be.asarray(rng.random((m, k), dtype=np.float32)), be.asarray(rng.random((k, n), dtype=np.float32))
        t = _best_time(lambda: be.matmul(a, b), repeats=3)
        nbytes = be.nbytes(a) + be.nbytes(b) + m * n * be.nbytes(a) // max(m * k, 1)
        out.append({"backend": backend, "dtype": dtype, "m": m, "k": k, "n": n, "time_s": t,
                    "flops": 2 * m * k * n, "bytes": nbytes, "tflops": 2 * m * k * n / t / 1e12})
        if progress:
            progress()
    return out


def fit_half_dim(points: list[dict], peak: float, bandwidth: float) -> float:
    """h minimising the squared log error of t = max(flops / (peak * d/(d+h)), bytes / bw) over the points."""
    best_h, best_err = 0.0, float("inf")
    for h in np.concatenate([[0.0], np.geomspace(1, 4096, 200)]):
        err = 0.0
        for p in points:
            d = min(p["m"], p["k"], p["n"])
            pred = max(p["flops"] / (peak * d / (d + h)), p["bytes"] / bandwidth)
            err += np.log(pred / p["time_s"]) ** 2
        if err < best_err:
            best_h, best_err = float(h), err
    return best_h


def vector_tflops(backend: str) -> float:
    """FLOP rate of the engine's own masked softmax on cache-resident scores (5 FLOPs per kept score)."""
    from perfmodel.engine.backend import make_backend

    be = make_backend(backend, "fp32")
    s = be.asarray(np.random.default_rng(0).random((64, 512), dtype=np.float32))
    mask = np.ones((64, 512), dtype=bool)
    mask_b = mask if backend == "numpy" else be.torch.as_tensor(mask)
    t = _best_time(lambda: be.masked_softmax(s, mask_b))
    return 5 * s.shape[0] * s.shape[1] / t / 1e12


def dispatch_overheads(backend: str, dtype: str = "fp32") -> tuple[dict, dict]:
    """Median time of each engine operator on tiny tensors (tiny models of every engine family): the fixed
    cost of one call, per operator name and per operator kind."""
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.tracer import Tracer
    from perfmodel.engine.transformer import KVCache, Transformer
    from perfmodel.engine.weights import random_weights
    from perfmodel.specs.model import ModelSpec

    tiny = dict(hidden_size=16, num_layers=4, num_heads=2, intermediate_size=16, vocab_size=32, max_position=64)
    specs = [ModelSpec(name="tiny", family="llama", num_kv_heads=1, **tiny),
             ModelSpec(name="tiny-gpt2", family="gpt2", num_kv_heads=2, **tiny),
             ModelSpec(name="tiny-moe", family="mixtral", num_kv_heads=1, num_experts=4, experts_per_token=2,
                       **tiny)]
    by_name: dict = {}
    by_kind: dict = {}
    for spec in specs:
        tr = Tracer(enabled=True)
        m = Transformer(spec, random_weights(spec), make_backend(backend, dtype), tracer=tr)
        ids = np.ones((1, 1), dtype=np.int64)
        for _ in range(3):
            cache = KVCache(m.be, spec, 1, 40)
            tr.clear()
            for _ in range(30):
                m.forward(ids, cache)
        for r in tr.records:
            by_name.setdefault(r.name, []).append(r.time_s)
            by_kind.setdefault(r.kind, []).append(r.time_s)
    med = lambda v: round(statistics.median(v) * 1e6, 2)  # noqa: E731
    return {k: med(v) for k, v in sorted(by_name.items())}, {k: med(v) for k, v in sorted(by_kind.items())}


CALIBRATION_CASES = [  # (model shape, layers, batch, prompt, decode contexts); random weights, and batch /
    # prompt / context points the validation grids do not use; three widths so matrix sizes span 0.4-400 MB
    ("smollm2-135m", 4, 1, 48, (96, 768)), ("smollm2-360m", 4, 2, 192, (400,)), ("smollm2-1.7b", 2, 1, 96, (700,)),
    ("gpt2", 4, 3, 80, (300,))]


def engine_profile(backend: str, hw_dict: dict, dtype: str = "fp32", progress=None) -> dict:
    """Fit per operator kind a compute and a memory efficiency multiplier (and, for matmuls, the half-bandwidth
    size), from the engine's own operators on CALIBRATION_CASES; per-call overheads are measured beforehand."""
    import dataclasses

    from perfmodel.costmodel.operators import Precision
    from perfmodel.specs.hardware import hardware_from_dict
    from perfmodel.validation.validate import Case, run_case

    hw = hardware_from_dict(hw_dict, "calibration").for_engine(backend)
    # measure with neutral multipliers, then fit them
    hw = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, kind_compute={}, kind_memory={}))
    rows = []
    loaded: dict = {}
    for model, layers, b, p, ctxs in CALIBRATION_CASES:
        case = Case(model, layers, backend, dtype, b, p, ctxs)
        rows += run_case(case, hw, repeats=2, loaded=loaded).op_rows
        if progress:
            progress(f"{backend} engine b{b} p{p}")
    fitted: dict = {"kind_compute": {}, "kind_memory": {}}
    from perfmodel.costmodel.roofline import compute_roof

    prec = Precision(dtype, dtype, dtype)
    eff = hw.efficiency
    grid = np.geomspace(0.05, 3.0, 64)
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind and r["measured_s"] > 0]
        meas = np.array([r["measured_s"] for r in rs])
        flops = np.array([r["flops"] for r in rs], dtype=np.float64)
        nbytes = np.array([r["bytes"] for r in rs], dtype=np.float64)
        layers = np.array([r.get("layers", 1) for r in rs], dtype=np.float64)
        shape = np.array([r.get("shape_eff", 1.0) for r in rs])
        # per-call overheads are measured, not fitted: only the two efficiency multipliers move
        over = np.array([eff.op_overhead_map_us.get(r["op"], eff.kind_overhead_us.get(kind, eff.op_overhead_us))
                         for r in rs]) * 1e-6 * layers
        peak = compute_roof(hw, kind, prec) * eff.compute
        bw = hw.memory_bandwidth * (eff.elementwise_memory if kind in ("elementwise", "memory")
                                    and eff.elementwise_memory else eff.memory)
        c = flops[None, :] / (peak * shape[None, :] * grid[:, None])  # [grid, rows]
        halves = np.concatenate([[0.0], np.geomspace(1e4, 1e8, 33)]) if kind == "matmul" else np.zeros(1)
        best = (np.inf, 0, 0, 0.0)
        for half in halves:
            m = nbytes[None, :] * (1 + half / nbytes[None, :]) / (bw * grid[:, None])
            pred = np.maximum(c[:, None, :], m[None, :, :]) + over[None, None, :]
            err = (np.log(pred / meas[None, None, :]) ** 2).sum(axis=-1)
            i, j = np.unravel_index(np.argmin(err), err.shape)
            if err[i, j] < best[0]:
                best = (err[i, j], i, j, half)
        fitted["kind_compute"][kind] = round(float(grid[best[1]]), 4)
        fitted["kind_memory"][kind] = round(float(grid[best[2]]), 4)
        if kind == "matmul":
            fitted["matmul_half_bytes"] = round(float(best[3]), 0)
    return fitted


def cache_sizes() -> dict:
    out = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level, kind, size = ((idx / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind in ("Data", "Unified"):
            out[f"L{level}"] = size
    return out


def memory_capacity_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    return 16.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_gpu() -> dict | None:
    """Name, memory and bandwidth of GPU 0 through pynvml, or None when there is no NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001  no driver, no GPU: a CPU-only machine
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        # DDR-style signalling: two transfers per clock
        bw = 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9
        return {"name": name, "memory_gb": round(mem / 1e9, 1), "memory_clock_mhz": clock_mhz,
                "bus_width_bits": bus_bits, "bandwidth_gbps_from_clocks": round(bw, 1)}
    finally:
        pynvml.nvmlShutdown()


def match_datasheet(gpu_name: str) -> str | None:
    """The library YAML for a pynvml device name, e.g. 'NVIDIA H100 80GB HBM3' -> h100-sxm."""
    n = gpu_name.lower()
    table = [("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100-sxm"), ("b200", "b200"),
             ("a100-sxm4-40gb", "a100-40gb"), ("a100 40gb", "a100-40gb"), ("a100", "a100-80gb"), ("l40s", "l40s"),
             ("l4", "l4"), ("4090", "rtx-4090"), ("3090", "rtx-3090")]
    for key, name in table:
        if key in n:
            return name
    return None


def calibrate(out_dir: Path, name: str | None = None, backends=("numpy", "torch"), progress=None,
              quick: bool = False, fit_engine: bool = True) -> tuple[Path, dict]:
    """Measure, fit, and write hardware/local-<name>.yaml atomically. Returns (path, the YAML dict)."""
    import yaml

    from perfmodel.output import _plain, atomic_write

    square, skinny = ((64, 256, 512), (1, 16, 256)) if quick else (SQUARE, SKINNY_M)
    have_torch = "torch" in backends
    if have_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            backends = tuple(b for b in backends if b != "torch")
    gpu = nvidia_gpu()
    step = progress or (lambda *a: None)
    from perfmodel.engine.membw import bandwidths

    bw = bandwidths()
    step("bandwidth")
    engines: dict = {}
    all_points = []
    for backend in backends:
        dtypes = ["fp32"] + (["bf16"] if backend == "torch" else [])
        peaks = {}
        for dt in dtypes:
            pts = matmul_points(backend, dt, lambda: step(f"{backend} {dt} matmul"), square, skinny)
            all_points += pts
            peaks[dt] = max(p["tflops"] for p in pts)
        half = fit_half_dim([p for p in all_points if p["backend"] == backend and p["dtype"] == "fp32"],
                            peaks["fp32"] * 1e12, bw["read_gbps"] * 1e9)
        vec = vector_tflops(backend)
        step(f"{backend} vector")
        per_op, per_kind = dispatch_overheads(backend)
        step(f"{backend} overheads")
        engines[backend] = {"peak_tflops": {k: round(v, 5) for k, v in peaks.items()},
                            "vector_tflops": round(vec, 6),
                            "efficiency": {"matmul_half_dim": round(half, 1), "kind_overhead_us": per_kind,
                                           "op_overhead_map_us": per_op}}
    host = name or socket.gethostname().split(".")[0].lower() or "machine"
    best = {}
    for prof in engines.values():
        for k, v in prof["peak_tflops"].items():
            best[k] = max(best.get(k, 0.0), v)
    first = engines[backends[0]]
    d = {
        "name": f"local-{host}", "description": f"{cpu_model()}, {os.cpu_count()} threads (measured)",
        "kind": "cpu", "peak_tflops": best, "vector_tflops": first["vector_tflops"],
        "memory": {"capacity_gb": memory_capacity_gb(), "bandwidth_gbps": round(bw["read_gbps"], 2),
                   "type": "host DRAM"},
        "onchip_cache_mb": _mb(cache_sizes().get("L3")), "interconnect": None, "launch_overhead_us": 0.0,
        "efficiency": {"compute": 1.0, "memory": 1.0, "matmul_half_dim": first["efficiency"]["matmul_half_dim"],
                       "elementwise_memory": round(min(1.0, bw["elementwise_gbps"] / bw["read_gbps"]), 3),
                       "kind_overhead_us": first["efficiency"]["kind_overhead_us"],
                       "op_overhead_map_us": first["efficiency"]["op_overhead_map_us"],
                       "optimistic": {"compute": 1.0, "memory": 1.0},
                       "pessimistic": {"compute": 0.7, "memory": 0.75}},
        "engines": engines, "power_w": None, "price_per_hour_usd": None,
        "sources": {"datasheet": "measured by perfmodel calibrate", "efficiency": "measured"},
        "provenance": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
                       "threads": os.cpu_count(), "numpy": np.__version__, "torch": _torch_version(),
                       "python": platform.python_version(), "caches": cache_sizes(),
                       "elementwise_gbps": round(bw["elementwise_gbps"], 2), "gpu": gpu,
                       "matmul_points": [{k: (round(v, 9) if isinstance(v, float) else v) for k, v in p.items()}
                                         for p in all_points]},
    }
    if gpu:
        d = _gpu_yaml(d, gpu, progress=step)
    elif fit_engine:
        for backend in backends:
            fitted = engine_profile(backend, d, progress=step)
            d["engines"][backend]["efficiency"].update(fitted)
        d["efficiency"].update(d["engines"][backends[0]]["efficiency"])
    path = out_dir / f"{d['name']}.yaml"
    atomic_write(path, lambda p: p.write_text("# Written by `perfmodel calibrate`; re-run it to refresh.\n"
                                              + yaml.safe_dump(_plain(d), sort_keys=False, width=120)))
    return path, d


def _gpu_yaml(d: dict, gpu: dict, progress) -> dict:
    """On an NVIDIA GPU: the datasheet YAML is the roof; efficiencies come from torch measurements on the GPU."""
    import torch

    from perfmodel.specs.hardware import load_hardware

    ref = match_datasheet(gpu["name"])
    sheet = load_hardware(ref) if ref else None
    dev = torch.device("cuda")
    peaks = {}
    for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (1024, 2048, 4096, 8192):
            a, b = torch.randn(n, n, device=dev, dtype=tdt), torch.randn(n, n, device=dev, dtype=tdt)
            torch.cuda.synchronize()
            t = _best_time(lambda: (a @ b, torch.cuda.synchronize()), repeats=3)
            best = max(best, 2 * n ** 3 / t / 1e12)
        peaks[dt] = best
        progress(f"gpu {dt} matmul")
    x = torch.empty(2 ** 28, device=dev, dtype=torch.float32)
    t = _best_time(lambda: (x.sum(), torch.cuda.synchronize()), repeats=3)
    bw = x.numel() * 4 / t / 1e9
    progress("gpu bandwidth")
    d["kind"] = "gpu"
    d["description"] = f"{gpu['name']} (measured; roof: {ref or 'no datasheet match'})"
    if sheet:
        d["peak_tflops"] = dict(sheet.peak_tflops)
        d["vector_tflops"] = sheet.vector_tflops
        d["memory"] = {"capacity_gb": gpu["memory_gb"], "bandwidth_gbps": sheet.memory_bandwidth_gbps,
                       "type": sheet.memory_type}
        d["efficiency"]["compute"] = round(min(1.0, peaks["bf16"] / sheet.peak_tflops.get("bf16", peaks["bf16"])), 3)
        d["efficiency"]["memory"] = round(min(1.0, bw / sheet.memory_bandwidth_gbps), 3)
    else:
        d["peak_tflops"] = {k: round(v, 2) for k, v in peaks.items()}
        d["memory"] = {"capacity_gb": gpu["memory_gb"], "bandwidth_gbps": round(bw, 1), "type": "GPU"}
    d["provenance"]["gpu_measured"] = {"tflops": {k: round(v, 2) for k, v in peaks.items()},
                                       "read_gbps": round(bw, 1)}
    return d


def _mb(size: str | None) -> float | None:
    if not size:
        return None
    size = size.upper()
    mult = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1], 1 / 2**20)
    return float(size.rstrip("KMG")) * mult


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:
        return None
