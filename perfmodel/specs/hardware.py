"""HardwareSpec: an accelerator's roofs (peak FLOP/s per dtype, memory bandwidth), capacity, links and cost."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from perfmodel.errors import PerfmodelError, bad_value, short
from perfmodel.schemas import (Fraction, NonNegative, Positive, Strict, dataclass_schema, is_file, read_yaml_mapping,
                               validate)


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
    # Host cost per sequence per layer of a ragged serving step's attention loop (the paged-KV write and
    # gather and one attention call per sequence), in place of the attention operators' own dispatch cost,
    # which calibration measures on batched forwards. None: the operators' dispatch cost (eager mode).
    ragged_sequence_us: float | None = None
    # Per efficiency group (an operator kind, or "gemv" for one-row matmuls): a multiplier on the per-call
    # dispatch cost measured on tiny tensors, fitted on real-size operators whose data is not in cache.
    kind_overhead_scale: dict = field(default_factory=dict)
    # Per row count m of a "skinny" matmul (2..16 rows): its time over the fastest row count's on the same
    # weights (>= 1), measured by calibration with the weights streaming from DRAM. A CPU BLAS runs rows in
    # register tiles, so 8 or 16 rows pack and stream the weights faster than 6, 12 or 14 do; the cost model
    # streams a skinny matmul's weights that many times slower. Empty: no table.
    skinny_rows: dict = field(default_factory=dict)
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
        prof = self.engines.get(engine) or self.engines.get(engine.split(":")[0])
        if not prof:
            return self
        peaks = {**self.peak_tflops, **{str(k): float(v) for k, v in (prof.get("peak_tflops") or {}).items()}}
        given = {k: v for k, v in (prof.get("efficiency") or {}).items() if v is not None}
        return dataclasses.replace(self, peak_tflops=peaks,
                                   vector_tflops=float(prof.get("vector_tflops", self.vector_tflops)),
                                   efficiency=dataclasses.replace(self.efficiency, **given))

    def slowed(self, factor: float, compute_factor: float | None = None) -> "HardwareSpec":
        """The same machine running every operator `factor` times slower (roofs divided, per-call and host
        costs multiplied): a machine whose speed has drifted since it was calibrated, as a shared VM's does.
        compute_factor, where given, slows the FLOP roofs instead (a shared VM's arithmetic and streaming
        speeds drift apart; perfmodel.validation.reference). The serving host time per step
        (host_overhead_us) is measured with the run and stays as it is."""
        for what, f in (("speed factor", factor), ("compute speed factor", compute_factor)):
            if f is not None and not f > 0:
                raise PerfmodelError(f"{what}: must be > 0, got {f}")
        cf = factor if compute_factor is None else compute_factor
        e = self.efficiency
        us = lambda v: None if v is None else v * factor  # noqa: E731
        eff = dataclasses.replace(
            e, op_overhead_us=e.op_overhead_us * factor, step_overhead_us=e.step_overhead_us * factor,
            layer_overhead_us=e.layer_overhead_us * factor, ragged_sequence_us=us(e.ragged_sequence_us),
            kind_overhead_us={k: v * factor for k, v in e.kind_overhead_us.items()},
            op_overhead_map_us={k: v * factor for k, v in e.op_overhead_map_us.items()})
        return dataclasses.replace(
            self, peak_tflops={k: v / cf for k, v in self.peak_tflops.items()},
            vector_tflops=self.vector_tflops / cf, memory_bandwidth_gbps=self.memory_bandwidth_gbps / factor,
            memory_levels=tuple(dataclasses.replace(lv, bandwidth_gbps=lv.bandwidth_gbps / factor)
                                for lv in self.memory_levels),
            launch_overhead_us=self.launch_overhead_us * factor, kernel_min_us=self.kernel_min_us * factor,
            graph_launch_us=us(self.graph_launch_us), efficiency=eff, engines={})

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


# --- the YAML schema ---------------------------------------------------------------------------------------
# Efficiency fields are derived from the dataclass (a new Efficiency field is validated as a finite number >= 0,
# a dict of them, ... with no change here); this table names the ones whose range is tighter.
EFFICIENCY_RULES = {
    "compute": Fraction, "memory": Fraction, "elementwise_memory": Fraction | None,
    "kind_compute": dict[str, Positive], "kind_memory": dict[str, Positive],
    "kind_overhead_us": dict[str, NonNegative], "op_overhead_map_us": dict[str, NonNegative],
    "skinny_rows": dict[Annotated[int, Field(ge=1)], Positive],
}
# every field optional: a YAML efficiency block overrides the base it applies to (nominal, or the engine's)
EfficiencySchema = dataclass_schema(Efficiency, EFFICIENCY_RULES, name="EfficiencySchema", all_optional=True)
NominalEfficiencySchema = dataclass_schema(
    Efficiency, EFFICIENCY_RULES, name="NominalEfficiencySchema", all_optional=True,
    extra_fields={"optimistic": (EfficiencySchema | None, None), "pessimistic": (EfficiencySchema | None, None)})


def _increasing_capacity(levels: list) -> list:
    for a, b in zip(levels, levels[1:]):
        if not b.capacity_mb > a.capacity_mb:
            raise PydanticCustomError("perfmodel_range", f"must be listed smallest first (capacity_mb strictly "
                                      f"increasing; {b.name!r} after {a.name!r})")
    return levels


def _some_peak(peaks: dict) -> dict:
    if not peaks:
        raise PydanticCustomError("perfmodel_range", "must list at least one dtype's peak (e.g. bf16: 989.4)")
    return peaks


class MemoryLevelSchema(Strict):
    name: str
    capacity_mb: Positive
    bandwidth_gbps: Positive


class MemorySchema(Strict):
    capacity_gb: Positive
    bandwidth_gbps: Positive
    type: str = ""
    levels: Annotated[list[MemoryLevelSchema], AfterValidator(_increasing_capacity)] = []


class InterconnectSchema(Strict):
    name: str
    bandwidth_gbps: Positive  # per direction, per device
    latency_us: NonNegative


class EngineSchema(Strict):
    """engines.<backend>: what one engine backend measured (calibrate), overriding the roofs it sees."""

    peak_tflops: dict[str, Positive] = {}
    vector_tflops: Positive | None = None
    efficiency: EfficiencySchema | None = None


class HardwareSchema(Strict):
    """A hardware YAML. To add a field: add it to HardwareSpec (with a default) and one line here; a field with
    the same name as a HardwareSpec field is passed through as is."""

    name: str
    description: str | None = None
    kind: str = "gpu"
    peak_tflops: Annotated[dict[str, Positive], AfterValidator(_some_peak)]
    vector_tflops: Positive | None = None  # default: peak_tflops.fp32
    memory: MemorySchema
    onchip_cache_mb: Positive | None = None
    interconnect: InterconnectSchema | None = None
    launch_overhead_us: NonNegative = 4.0
    kernel_min_us: NonNegative = 0.0
    graph_launch_us: NonNegative | None = None
    host_overhead_us: NonNegative = 0.0
    efficiency: NominalEfficiencySchema | None = None
    power_w: Positive | None = None
    price_per_hour_usd: NonNegative | None = None
    sources: dict | None = None
    provenance: dict | None = None
    engines: dict[str, EngineSchema] | None = None


_SPEC_FIELDS = {f.name for f in dataclasses.fields(HardwareSpec)}
_BUILT = {"name", "description", "peak_tflops", "vector_tflops", "memory", "interconnect", "efficiency", "sources",
          "provenance", "engines"}


def _eff(block, base: Efficiency) -> Efficiency:
    """base with the fields a validated efficiency block gives."""
    if block is None:
        return base
    given = {k: v for k, v in block.model_dump(exclude={"optimistic", "pessimistic"}).items() if v is not None}
    return dataclasses.replace(base, **given)


def hardware_from_dict(d: dict, where: str = "hardware") -> HardwareSpec:
    """Validate a hardware mapping (a parsed YAML) against HardwareSchema and build the HardwareSpec."""
    if not isinstance(d, dict):
        raise PerfmodelError(f"{where}: expected a mapping of fields, got {type(d).__name__}")
    h = validate(HardwareSchema, d, where)
    vector = h.vector_tflops or h.peak_tflops.get("fp32")
    if vector is None:
        raise PerfmodelError(f"{where}: vector_tflops: required when peak_tflops has no fp32 entry")
    eff = _eff(h.efficiency, Efficiency())
    ic = h.interconnect
    passthrough = {k: getattr(h, k) for k in HardwareSchema.model_fields
                   if k in _SPEC_FIELDS and k not in _BUILT}
    return HardwareSpec(
        name=h.name, description=h.description or h.name, peak_tflops=dict(h.peak_tflops), vector_tflops=vector,
        memory_capacity_gb=h.memory.capacity_gb, memory_bandwidth_gbps=h.memory.bandwidth_gbps,
        memory_type=h.memory.type,
        memory_levels=tuple(MemoryLevel(lv.name, lv.capacity_mb * 2**20, lv.bandwidth_gbps) for lv in h.memory.levels),
        interconnect=Interconnect(ic.name, ic.bandwidth_gbps, ic.latency_us) if ic else None,
        efficiency=eff,
        optimistic=_eff(h.efficiency.optimistic if h.efficiency else None, eff),
        pessimistic=_eff(h.efficiency.pessimistic if h.efficiency else None, eff),
        sources=h.sources or {}, provenance=h.provenance or {},
        engines={k: v.model_dump(exclude_none=True) for k, v in (h.engines or {}).items()},
        **{k: v for k, v in passthrough.items() if k not in ("memory_levels",)},
    )


def load_hardware_file(path: Path) -> HardwareSpec:
    d = read_yaml_mapping(path)
    return dataclasses.replace(hardware_from_dict(d, short(path)), path=str(path))


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
    if p.suffix in (".yaml", ".yml") and is_file(p):
        return load_hardware_file(p)
    for d in hardware_dirs():
        cand = d / f"{str(name_or_path).lower()}.yaml"
        if is_file(cand):
            return load_hardware_file(cand)
    names = sorted({q.stem for d in hardware_dirs() for q in d.glob("*.yaml")})
    raise bad_value("hardware", str(name_or_path), "a YAML path or one of " + ", ".join(names))
