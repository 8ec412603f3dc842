"""The accelerator library (hardware/*.yaml): every file loads, every figure names its source, the memory
hierarchy is physically ordered, and the figures the reference table covers match it."""

import re
from pathlib import Path

import pytest
import yaml

from perfmodel.cli.app import main
from perfmodel.specs import load_hardware

HW_DIR = Path(__file__).resolve().parents[1] / "hardware"
# hardware/local-*.yaml are written by `perfmodel calibrate` on each machine and are not part of the library
FILES = sorted(p for p in HW_DIR.glob("*.yaml") if not p.name.startswith("local-"))
NAMES = [p.stem for p in FILES]

# The accelerators the library must hold (issue 10 part 6 and the reference table).
REQUIRED = {"h100-sxm", "h100-pcie", "h200", "h20", "b200", "gb200", "b300", "a100-40gb", "a100-80gb", "a10g", "t4",
            "l4", "l20", "l40s", "rtx-3090", "rtx-4090", "rtx-5090", "mi300x", "mi325x", "mi355x", "tpu-v5e",
            "tpu-v6e", "gaudi3", "trainium2", "m2-ultra", "m3-max", "m4-max", "epyc-9654", "xeon-8480plus",
            "cpu-template"}

# Which `sources:` entry answers for which figure; the first key present wins.
DATED = re.compile(r"20\d\d-\d\d")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _cuda_or_hip(h) -> bool:
    """NVIDIA and AMD GPUs run CUDA/HIP graphs; Apple (Metal), TPUs, Gaudi and Trainium do not."""
    return h.kind == "gpu" and h.description.split()[0] in ("NVIDIA", "AMD")


def test_library_holds_every_required_accelerator():
    assert REQUIRED <= set(NAMES), sorted(REQUIRED - set(NAMES))


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_yaml_loads_and_is_named_after_its_file(path):
    h = load_hardware(str(path))
    assert h.name == path.stem
    assert load_hardware(path.stem).name == h.name
    assert h.kind in ("gpu", "cpu", "tpu", "npu")
    assert h.peak_tflops and h.vector_tflops > 0 and h.memory_bandwidth_gbps > 0 and h.memory_capacity_gb > 0


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_every_figure_has_a_source(path):
    d, h = _raw(path), load_hardware(str(path))
    src = {k: v for k, v in (d.get("sources") or {}).items() if isinstance(v, str) and v.strip()}
    needed = {"peak_tflops and memory": ("datasheet",), "efficiency": ("efficiency",)}
    if h.price_per_hour_usd is not None:
        needed["price_per_hour_usd"] = ("price",)
    if h.interconnect is not None:
        needed["interconnect"] = ("interconnect",)
    if h.memory_levels:
        needed["memory.levels"] = ("levels",)
    if h.onchip_cache_mb is not None:
        needed["onchip_cache_mb"] = ("onchip_cache", "levels", "datasheet")
    if h.kernel_min_us or h.graph_launch_us is not None:
        needed["kernel_min_us / graph_launch_us"] = ("launch",)
    if h.power_w is not None:
        needed["power_w"] = ("power", "datasheet")
    missing = [fig for fig, keys in needed.items() if not any(k in src for k in keys)]
    assert not missing, f"{path.name}: no source for {missing}"
    if h.name != "cpu-template":  # the template's figures are placeholders, not read from anywhere
        # a datasheet says when it was read, or says plainly that it could not be re-read here
        assert DATED.search(src["datasheet"]) or "not re-read" in src["datasheet"] or any(
            DATED.search(v) for v in src.values()), f"{path.name}: no source says when it was read"
    for key in ("levels", "launch"):  # the figures this library added name their date or commit
        if key in src:
            assert DATED.search(src[key]) or "@" in src[key], f"{path.name}: sources.{key} has no date"


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_memory_levels_are_ordered_and_faster_than_main_memory(path):
    h = load_hardware(str(path))
    levels = h.memory_levels
    caps = [lv.capacity_bytes for lv in levels]
    assert caps == sorted(caps) and len(set(caps)) == len(caps), "levels must grow in capacity, smallest first"
    bws = [lv.bandwidth_gbps for lv in levels]
    assert bws == sorted(bws, reverse=True), "a larger level is not faster than a smaller one"
    for lv in levels:
        assert lv.capacity_bytes < h.memory_capacity, lv.name
        if h.kind != "cpu":
            assert lv.bandwidth_gbps > h.memory_bandwidth_gbps, f"{lv.name} is not faster than main memory"
    if levels:
        assert h.onchip_cache_mb is not None and h.onchip_cache_mb * 2**20 >= caps[-1]


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_launch_figures_on_graph_capable_gpus(path):
    h = load_hardware(str(path))
    if _cuda_or_hip(h):
        assert 0.3 <= h.kernel_min_us <= 5, "a tiny kernel in a graph takes about 1-2 us"
        assert h.graph_launch_us is not None and h.kernel_min_us <= h.graph_launch_us <= 10
    else:
        assert h.kernel_min_us == 0 and h.graph_launch_us is None, "no CUDA/HIP graphs on this device"


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_tensor_peaks_are_dense(path):
    """A 'with sparsity' figure copied by mistake doubles a dtype against its neighbour."""
    h = load_hardware(str(path))
    p = h.peak_tflops
    if "fp8" in p and "bf16" in p:  # 2x, give or take the datasheet's rounding (L40S: 733 vs 362.05)
        assert p["fp8"] <= 2.05 * p["bf16"]
    if "bf16" in p and "fp32" in p and h.kind != "cpu":  # CPUs without bf16 units run it below fp32
        assert p["bf16"] >= 0.99 * p["fp32"]
    if "fp4" in p and "fp8" in p:
        assert p["fp4"] <= 4.05 * p["fp8"]


# Dense bf16 TFLOP/s, dense fp8 TFLOP/s (None: no fp8), memory bandwidth GB/s and capacity GB, copied from
# shared/reference/hardware_specs.csv (collected 2026-11). The test must not read ../shared: CI has only the repo.
REFERENCE = {
    "a100-40gb": (312, None, 1555, 40),        # row "NVIDIA A100 40GB SXM4"
    "a100-80gb": (312, None, 2039, 80),        # row "NVIDIA A100 80GB SXM4"
    "h100-sxm": (989.4, 1978.9, 3350, 80),     # row "NVIDIA H100 SXM5 80GB"
    "h100-pcie": (756, 1513, 2000, 80),        # row "NVIDIA H100 PCIe 80GB"
    "h200": (989.4, 1978.9, 4800, 141),        # row "NVIDIA H200 SXM 141GB"
    "b200": (2250, 4500, 8000, 180),           # row "NVIDIA B200 (HGX/DGX)" (180 GB, DGX B200)
    "l4": (121, 242.5, 300, 24),               # row "NVIDIA L4 24GB"
    "l40s": (362.05, 733, 864, 48),            # row "NVIDIA L40S 48GB"
    "rtx-4090": (165.2, 330.3, 1008, 24),      # row "NVIDIA GeForce RTX 4090 24GB" (fp32 accumulate)
    "rtx-3090": (71, None, 936, 24),           # row "NVIDIA GeForce RTX 3090 24GB" (fp32 accumulate)
    "mi300x": (1307.4, 2614.9, 5300, 192),     # row "AMD Instinct MI300X 192GB"
    "m2-ultra": (27, None, 800, 192),          # row "Apple M2 Ultra (76-core GPU)" (~27, GPU ALUs)
    "m3-max": (14, None, 400, 128),            # row "Apple M3 Max (40-core GPU)" (~14)
    "m4-max": (16, None, 546, 128),            # row "Apple M4 Max (40-core GPU)" (~16)
    "tpu-v5e": (197, None, 819, 16),           # row "Google TPU v5e (per chip)"
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_figures_match_the_reference_table(name):
    bf16, fp8, bw, cap = REFERENCE[name]
    h = load_hardware(name)
    tol = 0.03 if name.startswith("m") and "-" in name and name[1].isdigit() else 0.001  # Apple rows are "~"
    assert h.peak_tflops["bf16"] == pytest.approx(bf16, rel=tol)
    if fp8 is None:
        assert "fp8" not in h.peak_tflops
    else:
        assert h.peak_tflops["fp8"] == pytest.approx(fp8, rel=tol)
    assert h.memory_bandwidth_gbps == pytest.approx(bw)
    assert h.memory_capacity_gb == pytest.approx(cap)


def test_hardware_command_lists_the_whole_library(capsys):
    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out, name
    assert main(["hardware", "--format", "json"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= set(NAMES)
