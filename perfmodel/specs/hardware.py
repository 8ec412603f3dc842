"""HardwareSpec: an accelerator's roofs (peak FLOP/s per dtype, memory bandwidth), capacity, links and cost."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from perfmodel.errors import PerfmodelError, bad_value


@dataclass(frozen=True)
class Efficiency:
    """Achievable fraction of the datasheet roofs. A few interpretable numbers, fitted by calibration."""

    compute: float = 0.7
    memory: float = 0.8
    # Matmuls whose smallest dimension is d reach compute * d / (d + matmul_half_dim) of peak:
    # small matrices cannot fill the machine. 0 turns the penalty off.
    matmul_half_dim: float = 0.0
    # Matmuls moving b bytes stream at memory * b / (b + matmul_half_bytes): small ones cannot keep every core's
    # prefetchers busy. 0 turns it off.
    matmul_half_bytes: float = 0.0
    # Fixed cost per operator launch, beyond the hardware's launch_overhead (engine dispatch, Python).
    op_overhead_us: float = 0.0
    # Bandwidth reached by elementwise ops, which stream less efficiently than large reads (fraction of memory).
    elementwise_memory: float | None = None
    # Per operator kind (matmul, attention, elementwise, memory): dispatch cost of one call, overriding
    # op_overhead_us. Calibration measures it for each engine backend.
    kind_overhead_us: dict = field(default_factory=dict)
    # Per operator name (q_proj, softmax, ...): dispatch cost of one call, the most specific figure.
    op_overhead_map_us: dict = field(default_factory=dict)
    # Host time of one eager forward pass outside its operators (the glue between them): per step and per layer.
    step_overhead_us: float = 0.0
    layer_overhead_us: float = 0.0
    # Per operator kind: multipliers on the compute and memory efficiency (fitted by calibration; 1 if absent).
    kind_compute: dict = field(default_factory=dict)
    kind_memory: dict = field(default_factory=dict)

    def scaled(self, compute: float, memory: float) -> "Efficiency":
        return dataclasses.replace(self, compute=compute, memory=memory)


@dataclass(frozen=True)
class MemoryLevel:
    """One on-chip level of the memory hierarchy (L2, last-level cache, SRAM): what it holds and how fast all
    threads (or SMs) together read from it. Main memory is the HardwareSpec's own capacity and bandwidth."""

    name: str
    capacity_bytes: float
    bandwidth_gbps: float

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbps * 1e9


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth_gbps: float  # per direction, per device
    latency_us: float


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    description: str
    kind: str
    peak_tflops: dict[str, float]
    vector_tflops: float
    memory_capacity_gb: float
    memory_bandwidth_gbps: float
    memory_type: str = ""
    onchip_cache_mb: float | None = None
    interconnect: Interconnect | None = None
    launch_overhead_us: float = 4.0
    # on-chip levels, smallest first (YAML memory.levels); an operator's bytes come from the smallest level
    # that holds its working set at the reuse distance that matters (perfmodel.costmodel.hierarchy)
    memory_levels: tuple[MemoryLevel, ...] = ()
    # graph / fused execution: a kernel still costs at least kernel_min_us, and a step costs one launch
    kernel_min_us: float = 0.0
    graph_launch_us: float | None = None  # None: launch_overhead_us
    # host time per serving step outside the forward pass (scheduling, batching, sampling)
    host_overhead_us: float = 0.0
    efficiency: Efficiency = field(default_factory=Efficiency)
    optimistic: Efficiency | None = None
    pessimistic: Efficiency | None = None
    power_w: float | None = None
    price_per_hour_usd: float | None = None
    sources: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)  # per engine backend: overrides of peaks and efficiency
    path: str = ""

    def for_engine(self, engine: str) -> "HardwareSpec":
        """The machine as one engine backend sees it (calibrated peaks and overheads), if profiled."""
        prof = self.engines.get(engine)
        if not prof:
            return self
        where = f"{self.name}: engines.{engine}"
        peaks = {**self.peak_tflops, **{str(k): float(v) for k, v in (prof.get("peak_tflops") or {}).items()}}
        return dataclasses.replace(self, peak_tflops=peaks,
                                   vector_tflops=float(prof.get("vector_tflops", self.vector_tflops)),
                                   efficiency=_eff(prof.get("efficiency"), self.efficiency, where))

    def peak_flops(self, dtype: str) -> float:
        try:
            return self.peak_tflops[dtype] * 1e12
        except KeyError:
            raise bad_value(f"hardware {self.name}: compute dtype", dtype, "|".join(self.peak_tflops)) from None

    @property
    def memory_bandwidth(self) -> float:
        return self.memory_bandwidth_gbps * 1e9

    @property
    def memory_capacity(self) -> float:
        return self.memory_capacity_gb * 1e9

    def with_efficiency(self, which: str) -> "HardwareSpec":
        """The same hardware under its 'nominal', 'optimistic' or 'pessimistic' efficiency factors."""
        if which == "nominal":
            return self
        eff = {"optimistic": self.optimistic, "pessimistic": self.pessimistic}.get(which, "bad")
        if eff == "bad":
            raise bad_value("efficiency", which, "nominal|optimistic|pessimistic")
        return dataclasses.replace(self, efficiency=eff or self.efficiency)


def hardware_dirs() -> list[Path]:
    """Where hardware YAMLs are looked up: $PERFMODEL_HARDWARE_DIR, ./hardware, then the repository's hardware/."""
    dirs = []
    if os.environ.get("PERFMODEL_HARDWARE_DIR"):
        dirs.append(Path(os.environ["PERFMODEL_HARDWARE_DIR"]))
    dirs.append(Path.cwd() / "hardware")
    dirs.append(Path(__file__).resolve().parents[2] / "hardware")
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def _eff(d: dict | None, base: Efficiency, where: str) -> Efficiency:
    if d is None:
        return base
    allowed = {f.name for f in dataclasses.fields(Efficiency)}
    bad = sorted(set(d) - allowed - {"optimistic", "pessimistic"})
    if bad:
        raise PerfmodelError(f"{where}: unknown efficiency field {bad[0]!r}; allowed: {', '.join(sorted(allowed))}")
    vals = {k: v for k, v in d.items() if k in allowed}
    for k, v in vals.items():
        if k in ("kind_overhead_us", "kind_compute", "kind_memory", "op_overhead_map_us"):
            if not isinstance(v, dict) or any(not isinstance(x, (int, float)) or x < 0 for x in v.values()):
                raise bad_value(f"{where}: efficiency.{k}", v, "a mapping of operator kind to a number >= 0")
        elif v is not None and (not isinstance(v, (int, float)) or v < 0):
            raise bad_value(f"{where}: efficiency.{k}", v, "a non-negative number")
    for k in ("compute", "memory"):
        if k in vals and not 0 < vals[k] <= 1:
            raise bad_value(f"{where}: efficiency.{k}", vals[k], "a number in (0, 1]")
    return dataclasses.replace(base, **vals)


def hardware_from_dict(d: dict, where: str = "hardware") -> HardwareSpec:
    try:
        mem = d["memory"]
        peaks = {str(k): float(v) for k, v in d["peak_tflops"].items()}
        eff = _eff(d.get("efficiency"), Efficiency(), where)
        ic = d.get("interconnect")
        spec = HardwareSpec(
            name=str(d["name"]), description=str(d.get("description", d["name"])), kind=str(d.get("kind", "gpu")),
            peak_tflops=peaks, vector_tflops=float(d.get("vector_tflops") or peaks.get("fp32", 0.0)),
            memory_capacity_gb=float(mem["capacity_gb"]), memory_bandwidth_gbps=float(mem["bandwidth_gbps"]),
            memory_type=str(mem.get("type", "")), onchip_cache_mb=d.get("onchip_cache_mb"),
            interconnect=Interconnect(str(ic["name"]), float(ic["bandwidth_gbps"]), float(ic["latency_us"]))
            if ic else None,
            launch_overhead_us=float(d.get("launch_overhead_us", 4.0)),
            memory_levels=tuple(MemoryLevel(str(lv["name"]), float(lv["capacity_mb"]) * 2**20,
                                            float(lv["bandwidth_gbps"])) for lv in mem.get("levels") or ()),
            kernel_min_us=float(d.get("kernel_min_us", 0.0)),
            graph_launch_us=None if d.get("graph_launch_us") is None else float(d["graph_launch_us"]),
            host_overhead_us=float(d.get("host_overhead_us", 0.0)),
            efficiency=eff,
            optimistic=_eff((d.get("efficiency") or {}).get("optimistic"), eff, where),
            pessimistic=_eff((d.get("efficiency") or {}).get("pessimistic"), eff, where),
            power_w=d.get("power_w"), price_per_hour_usd=d.get("price_per_hour_usd"),
            sources=d.get("sources") or {}, provenance=d.get("provenance") or {}, engines=d.get("engines") or {},
        )
    except KeyError as e:
        raise PerfmodelError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise PerfmodelError(f"{where}: bad field value ({e})") from None
    if spec.memory_bandwidth_gbps <= 0 or spec.memory_capacity_gb <= 0:
        raise PerfmodelError(f"{where}: memory.bandwidth_gbps and memory.capacity_gb must be positive")
    if not peaks or min(peaks.values()) <= 0:
        raise PerfmodelError(f"{where}: peak_tflops must list positive figures per dtype")
    return spec


def load_hardware_file(path: Path) -> HardwareSpec:
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PerfmodelError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(d, dict):
        raise PerfmodelError(f"{path}: expected a YAML mapping of fields")
    return dataclasses.replace(hardware_from_dict(d, str(path)), path=str(path))


def list_hardware() -> list[HardwareSpec]:
    found: dict[str, HardwareSpec] = {}
    for d in hardware_dirs():
        for p in sorted(d.glob("*.yaml")):
            if p.stem not in found:
                found[p.stem] = load_hardware_file(p)
    return list(found.values())


def load_hardware(name_or_path: str | HardwareSpec) -> HardwareSpec:
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_hardware_file(p)
    for d in hardware_dirs():
        cand = d / f"{str(name_or_path).lower()}.yaml"
        if cand.is_file():
            return load_hardware_file(cand)
    names = sorted({q.stem for d in hardware_dirs() for q in d.glob("*.yaml")})
    raise bad_value("hardware", str(name_or_path), "a YAML path or one of " + ", ".join(names))
