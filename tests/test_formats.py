"""Weight/KV storage formats: exact bytes of every block layout, held against the published layouts."""

import pytest

from perfmodel.dtypes import DTYPES, bytes_per_element, elements_bytes, get_dtype, tensor_bytes
from conftest import has, needs_weights

# (elements per block, bytes per block) as published:
# GGUF: ggml-org/llama.cpp ggml/src/ggml-common.h (block_q4_0 ... block_q6_K and their static_asserts);
# MXFP4: OCP Microscaling Formats (MX) v1.0, 32 fp4 e2m1 elements + one 8-bit e8m0 shared scale;
# NVFP4: NVIDIA's NVFP4 (16 e2m1 elements + one fp8 e4m3 scale; one fp32 scale per tensor on top).
PUBLISHED_BLOCKS = {
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    "mxfp4": (32, 17), "nvfp4": (16, 9),
}


@pytest.mark.parametrize("fmt", sorted(PUBLISHED_BLOCKS))
def test_block_layout_matches_published_size(fmt):
    block, nbytes = PUBLISHED_BLOCKS[fmt]
    dt = get_dtype(fmt)
    assert (dt.block_size, dt.block_bytes) == (block, nbytes)
    assert tensor_bytes(block * 1000, fmt) == 1000 * nbytes + dt.tensor_scale_bytes
    assert bytes_per_element(fmt) == nbytes / block


@pytest.mark.skipif(not has("gguf"), reason="pip install gguf")
@pytest.mark.parametrize("fmt", sorted(f for f in PUBLISHED_BLOCKS if f.startswith("q") or f == "mxfp4"))
def test_gguf_formats_equal_the_gguf_packages_table(fmt):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    dt = get_dtype(fmt)
    assert gguf.GGML_QUANT_SIZES[qtype] == (dt.block_size, dt.block_bytes)


def test_bits_per_element_of_the_k_quants():
    # ggml-common.h's comments: q4_K "effectively 4.5 bits per weight", q5_K 5.5, q6_K 6.5625, q2_K 2.625
    assert [bytes_per_element(f) * 8 for f in ("q2_k", "q4_k", "q5_k", "q6_k")] == [2.625, 4.5, 5.5, 6.5625]
    assert bytes_per_element("nvfp4") * 8 == 4.5 and bytes_per_element("mxfp4") * 8 == 4.25


def test_partial_last_block_is_padded_and_tensor_scale_counted_once():
    assert tensor_bytes(1, "q4_0") == 18
    assert tensor_bytes(33, "q4_0") == 2 * 18
    assert tensor_bytes(257, "q4_k") == 2 * 144
    assert tensor_bytes(255, "q6_k") == 210
    assert tensor_bytes(16, "nvfp4") == 9 + 4  # one block + the per-tensor fp32 scale
    assert tensor_bytes(17, "nvfp4") == 2 * 9 + 4
    assert elements_bytes(17, "nvfp4") == 2 * 9  # part of a larger tensor: no tensor scale
    assert tensor_bytes(4096 * 4096, "nvfp4") == 4096 * 4096 // 16 * 9 + 4
    assert tensor_bytes(33, "mxfp4") == 2 * 17
    # blocks run along each row: two rows of 40 need two blocks each
    assert tensor_bytes(80, "q8_0", row=40) == 4 * 34
    assert tensor_bytes(80, "q8_0") == 3 * 34


def test_existing_formats_unchanged():
    assert tensor_bytes(128, "int4") == 64 + 2
    assert tensor_bytes(256, "int8") == 256 + 4
    assert tensor_bytes(100, "bf16") == 200
    assert tensor_bytes(100, "fp8") == 100
    assert bytes_per_element("int4") == 0.5 + 2 / 128
    assert {"fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4"} <= set(DTYPES)


@needs_weights
@pytest.mark.weights
def test_q4_1_bytes_equal_the_smollm2_gguf_tensors():
    """The real SmolLM2 GGUF stores 210 tensors as Q4_1 and the embedding as Q8_0: our byte count of every one
    equals the size gguf reads from the file."""
    import gguf

    from perfmodel.engine.weights import smollm2_gguf_path

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    seen = {"q4_1": 0, "q8_0": 0}
    for t in reader.tensors:
        fmt = t.tensor_type.name.lower()
        if fmt in seen:
            n, row = int(t.n_elements), int(t.shape[0])
            assert tensor_bytes(n, fmt, row=row) == int(t.n_bytes), t.name
            assert tensor_bytes(n, fmt) == int(t.n_bytes), t.name  # rows are whole blocks here
            seen[fmt] += 1
    assert seen == {"q4_1": 210, "q8_0": 1}


def test_compute_dtype_rule():
    from perfmodel.costmodel.operators import Precision
    from perfmodel.dtypes import resolve_compute_dtype
    from perfmodel.specs import load_hardware

    h100, b200 = load_hardware("h100-sxm"), load_hardware("b200")
    native = ("bf16", "fp16", "fp8", "fp4")  # a framework profile's native_compute
    fp8, fp4 = Precision(weights="fp8"), Precision(weights="nvfp4")
    assert resolve_compute_dtype(fp8, h100, native) == "fp8"  # Hopper fp8 tensor cores
    assert resolve_compute_dtype(fp8, h100, ("bf16",)) == "bf16"  # the framework dequantises
    assert resolve_compute_dtype(fp8, load_hardware("a100-80gb"), native) == "bf16"  # no fp8 peak: dequantise
    assert resolve_compute_dtype(fp4, h100, native) == "bf16"  # no fp4 on Hopper
    assert resolve_compute_dtype(fp4, b200, native) == "fp4"
    assert resolve_compute_dtype(Precision(weights="mxfp4"), b200, ("mxfp4",)) == "fp4"  # format names work too
    for gguf_fmt in ("q4_0", "q4_k", "q8_0", "int4"):  # block/group integer formats: always a dequantising GEMM
        assert resolve_compute_dtype(Precision(weights=gguf_fmt), b200, native + (gguf_fmt,)) == "bf16"
    assert resolve_compute_dtype(Precision(weights="nvfp4", compute="fp8"), b200, native) == "fp8"  # explicit wins


def test_native_fp4_speeds_matmuls_not_attention():
    from perfmodel.costmodel.operators import Precision, phase_ops
    from perfmodel.costmodel.roofline import op_timing
    from perfmodel.specs import load_hardware, load_model

    b200, m = load_hardware("b200"), load_model("llama-3.1-8b")
    ops = {o.name: o for o in phase_ops(m, 8, 2048, 0, Precision(weights="nvfp4"))}
    deq = Precision(weights="nvfp4")
    native = Precision(weights="nvfp4", compute="fp4")
    up = ops["up_proj"]
    ratio = b200.peak_tflops["fp4"] / b200.peak_tflops["bf16"]
    assert op_timing(up, b200, deq).compute_s == pytest.approx(ratio * op_timing(up, b200, native).compute_s)
    assert op_timing(ops["attention"], b200, native).compute_s == op_timing(ops["attention"], b200, deq).compute_s
    assert up.weight_bytes == tensor_bytes(m.hidden_size * m.intermediate_size, "nvfp4")


def test_block_formats_are_not_activation_dtypes():
    from perfmodel.costmodel.operators import Precision
    from perfmodel.errors import PerfmodelError

    with pytest.raises(PerfmodelError, match="activation dtype"):
        Precision(activations="q4_k")
    Precision(weights="q4_k", kv_cache="q8_0")  # fine as weights and as a llama.cpp KV cache type
