"""Serving-framework profiles: the same model on the same GPU runs differently under each framework.

A profile (perfmodel/frameworks/<name>.yaml) separates the framework's efficiency from the model's cost:
- `exec`: the execution mode it runs (perfmodel.costmodel.execution: eager | graph | fused);
- `efficiency`: multipliers on the hardware's achievable compute and memory efficiency, overall
  (`compute`, `memory`) and per operator kind (`kinds: {matmul: {compute, memory}, attention: ...}`), per
  hardware family where they differ (key `default`, then a family such as `hopper`, `ampere`, `cdna3`, then a
  hardware name: the most specific key that matches wins);
- `host_overhead_us`: host time per serving step outside the forward pass (scheduler, input preparation,
  sampling, detokenisation), per hardware family like the efficiencies;
- `kv_block_tokens`, `weight_formats`, `kv_formats`, `native_compute` (formats its GEMMs run natively);
- `fp16_accumulate`: its fp16 GEMMs accumulate in fp16, so they run at the hardware's `fp16_acc16` peak where the
  hardware lists one (GeForce boards: twice their fp32-accumulate rate);
- `provenance`: where every figure comes from (a source, or "fitted" with the fit's data and date).
`apply_framework(hw, profile)` is the hardware as that framework sees it; `resolve_runtime` turns the CLI's
--framework / --exec into (hardware, exec mode, profile) for every command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from typing import Annotated, Any, Literal

from pydantic import StrictBool, StringConstraints, field_validator

from perfmodel.costmodel.execution import DEFAULT_EXEC, EXEC_MODES, check_exec_mode
from perfmodel.errors import PerfmodelError, bad_value
from perfmodel.schemas import Strict, count, number, validate
from perfmodel.specs.hardware import HardwareSpec

KINDS = ("matmul", "attention", "elementwise", "memory")

# hardware library names -> family (the most specific efficiency key a profile may give); the first family whose
# prefix matches wins. GeForce boards are a family of their own beside the datacenter parts of their architecture:
# their fp16/bf16 tensor math accumulates in fp32 at half rate (the library's peaks), in fp16 at the full rate
# (which llama.cpp's cuBLAS GEMMs use), with GDDR memory and consumer clocks and power, so a framework's efficiency
# against the library's figures differs from an A100's or an L40S's.
FAMILIES = {
    "geforce": ("rtx-2080", "rtx-3090", "rtx-4090", "rtx-5090"),
    "hopper": ("h100", "h200", "h20", "gh200"),
    "blackwell": ("b200", "b300", "gb200", "gb300", "rtx-5090", "rtx-pro"),
    "ada": ("l4", "l40", "l20", "rtx-4090", "rtx-6000-ada"),
    "ampere": ("a100", "a10", "a30", "a40", "rtx-3090"),
    "turing": ("t4",),
    "cdna3": ("mi300", "mi325"),
    "cdna4": ("mi350", "mi355"),
    "apple": ("m1", "m2", "m3", "m4"),
    "tpu": ("tpu",),
}


def hardware_family(hw: HardwareSpec) -> str:
    name = hw.name.lower()
    for fam, prefixes in FAMILIES.items():
        if any(name.startswith(p) for p in prefixes):
            return fam
    return hw.kind  # cpu, gpu, ...


@dataclass(frozen=True)
class FrameworkProfile:
    name: str
    description: str
    exec_mode: str
    version: str = ""
    efficiency: dict = field(default_factory=dict)  # family -> {compute, memory, <kind>: {compute, memory}}
    host_overhead_us: dict = field(default_factory=dict)  # family -> µs per serving step
    kv_block_tokens: int = 16
    weight_formats: tuple[str, ...] = ()
    kv_formats: tuple[str, ...] = ()
    native_compute: tuple[str, ...] = ()
    fp16_accumulate: bool = False
    provenance: dict = field(default_factory=dict)
    path: str = ""

    def _for(self, table: dict, hw: HardwareSpec):
        fam = hardware_family(hw)
        for key in (hw.name, fam, "default"):
            if key in table:
                return table[key]
        return None

    def efficiency_for(self, hw: HardwareSpec) -> dict:
        return self._for(self.efficiency, hw) or {}

    def host_overhead_for(self, hw: HardwareSpec) -> float:
        v = self._for(self.host_overhead_us, hw)
        return float(v) if v is not None else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exec"] = d.pop("exec_mode")
        d.pop("path")
        return d


Multiplier = number(gt=0, le=2)  # on the hardware's efficiency: a framework may beat the library's band
HostMicros = number(ge=0, le=1e7)
FormatName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]


class KindMultipliers(Strict):
    compute: Multiplier | None = None
    memory: Multiplier | None = None


class FamilyEfficiency(Strict):
    compute: Multiplier | None = None
    memory: Multiplier | None = None
    kinds: dict[Literal[KINDS], KindMultipliers] | None = None


class FrameworkSchema(Strict):
    """A profile YAML as written: unknown fields refused, every multiplier and time finite and in range."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: str | None = None
    version: str = ""
    exec: Literal[EXEC_MODES]
    efficiency: dict[str, FamilyEfficiency] | None = None
    host_overhead_us: dict[str, HostMicros] | None = None  # per hardware family; one figure is the default's
    kv_block_tokens: count(1, 4096) = 16
    weight_formats: list[FormatName] | None = None
    kv_formats: list[FormatName] | None = None
    native_compute: list[FormatName] | None = None
    fp16_accumulate: StrictBool = False
    provenance: dict[str, Any] | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _unquoted_version(cls, v):
        # `version: 0.11` in YAML is a float; it names a release all the same
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("host_overhead_us", mode="before")
    @classmethod
    def _one_figure_is_the_default(cls, v):
        return v if isinstance(v, dict) or v is None else {"default": v}


def profile_from_dict(d: dict, where: str) -> FrameworkProfile:
    f = validate(FrameworkSchema, d, where)
    host = f.host_overhead_us or {}
    eff = {fam: t.model_dump(exclude_none=True) for fam, t in (f.efficiency or {}).items()}
    return FrameworkProfile(name=f.name, description=f.description or f.name, exec_mode=f.exec, version=f.version,
                            efficiency=eff, host_overhead_us=dict(host), kv_block_tokens=f.kv_block_tokens,
                            weight_formats=tuple(f.weight_formats or ()), kv_formats=tuple(f.kv_formats or ()),
                            native_compute=tuple(f.native_compute or ()), fp16_accumulate=f.fp16_accumulate,
                            provenance=f.provenance or {}, path=where)


@lru_cache(maxsize=None)
def _builtin() -> dict[str, FrameworkProfile]:
    out = {}
    for f in sorted(resources.files("perfmodel.frameworks").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            prof = profile_from_dict(yaml.safe_load(f.read_text()), f.name)
            out[prof.name] = prof
    return out


def list_frameworks() -> list[FrameworkProfile]:
    return list(_builtin().values())


def load_framework(name_or_path: str) -> FrameworkProfile:
    lib = _builtin()
    if name_or_path.lower() in lib:
        return lib[name_or_path.lower()]
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        try:
            text = p.read_text()
        except OSError as e:
            raise PerfmodelError(f"--framework: cannot read {name_or_path[:200]}: {e.strerror}") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PerfmodelError(f"{p.name}: malformed YAML: {getattr(e, 'problem', e)}") from None
        return profile_from_dict(d, p.name)
    raise bad_value("--framework", name_or_path[:200], "a profile YAML path or one of " + ", ".join(lib))


def apply_framework(hw: HardwareSpec, prof: FrameworkProfile) -> HardwareSpec:
    """The hardware as this framework runs on it: efficiencies scaled by the profile's multipliers (nominal,
    optimistic and pessimistic alike), the framework's host overhead per serving step, and the fp16 peak of
    fp16-accumulating GEMMs where the framework runs them and the hardware lists that rate."""
    table = prof.efficiency_for(hw)
    peaks = hw.peak_tflops
    if prof.fp16_accumulate and "fp16_acc16" in peaks:
        peaks = {**peaks, "fp16": peaks["fp16_acc16"]}

    def scale(eff):
        if eff is None:
            return None
        kc, km = dict(eff.kind_compute), dict(eff.kind_memory)
        for kind in KINDS:
            sub = (table.get("kinds") or {}).get(kind) or {}
            if "compute" in sub:
                kc[kind] = kc.get(kind, 1.0) * sub["compute"]
            if "memory" in sub:
                km[kind] = km.get(kind, 1.0) * sub["memory"]
        return dataclasses.replace(eff, compute=min(1.0, eff.compute * table.get("compute", 1.0)),
                                   memory=min(1.0, eff.memory * table.get("memory", 1.0)),
                                   kind_compute=kc, kind_memory=km)

    return dataclasses.replace(hw, efficiency=scale(hw.efficiency), optimistic=scale(hw.optimistic),
                               pessimistic=scale(hw.pessimistic), host_overhead_us=prof.host_overhead_for(hw),
                               peak_tflops=peaks)


def resolve_runtime(hw: HardwareSpec, exec_mode: str | None, framework: str | None):
    """(hardware as run, exec mode, profile or None) from --exec and --framework: the profile names a mode,
    --exec overrides it, and without either the serving default applies."""
    prof = load_framework(framework) if framework else None
    mode = check_exec_mode(exec_mode) if exec_mode else (prof.exec_mode if prof else DEFAULT_EXEC)
    return (apply_framework(hw, prof) if prof else hw), mode, prof


def framework_precision(precision, hw: HardwareSpec, prof: FrameworkProfile | None):
    """The precision as the framework runs it: its weight and KV formats must be ones it supports, and the
    weight matmuls run natively on fp8/fp4 tensor cores where the framework and the hardware both have them,
    else as a dequantising GEMM at the activation dtype (perfmodel.dtypes.resolve_compute_dtype)."""
    if prof is None:
        return precision
    import dataclasses

    from perfmodel.dtypes import resolve_compute_dtype

    if prof.weight_formats and precision.weights not in prof.weight_formats:
        raise bad_value(f"--weight-dtype (framework {prof.name})", precision.weights, "|".join(prof.weight_formats))
    if prof.kv_formats and precision.kv_cache not in prof.kv_formats:
        raise bad_value(f"--kv-dtype (framework {prof.name})", precision.kv_cache, "|".join(prof.kv_formats))
    if precision.compute:
        return precision
    return dataclasses.replace(precision, compute=resolve_compute_dtype(precision, hw, prof.native_compute))
