"""Storage size of each numeric format, with its scales counted exactly, and the dtype its matmuls compute in.

- Float formats (fp32, tf32, bf16, fp16, fp8) carry no metadata.
- Integer formats (int8, int4) carry one fp16 scale per group of 128 elements, the common group-wise weight
  quantisation layout (AWQ/GPTQ g128). int8_channel carries one 16-bit scale per output channel (per row of
  `row` input elements): the layout of PyTorch's weight-only int8 kernel (aten._weight_int8pack_mm), which the
  reference engine's int8 draft model runs; without `row` its scales are not counted.
- Block formats store whole blocks: `block_bytes` per `block_size` elements, codes and the block's scales
  (and mins) together, a partial last block padded to a whole one; some also carry one scale per tensor.
  * NVFP4: 16 e2m1 codes (8 bytes) + one fp8 e4m3 scale per block, plus one fp32 scale per tensor
    (NVIDIA, "Introducing NVFP4 for Efficient and Accurate Low-Precision Inference", developer.nvidia.com
    technical blog, 2025-06-24).
  * MXFP4: 32 e2m1 codes (16 bytes) + one e8m0 scale per block (OCP Microscaling Formats (MX) Specification
    v1.0, 2023-09; ggml's block_mxfp4 is the same 17 bytes). gpt-oss publishes its expert weights so.
  * GGUF (ggml-org/llama.cpp ggml/src/ggml-common.h at aca2e6ce7909064dbfbf3bd168e9ad3db1826e6c):
    q4_0 = fp16 d + 16 B nibbles (18 B / 32); q4_1 = d + fp16 min m + 16 B (20 B); q5_0 = d + 4 B high bits +
    16 B (22 B); q5_1 = d + m + 4 B + 16 B (24 B); q8_0 = d + 32 int8 (34 B); and the K-quants' 256-element
    super-blocks: q2_k = 16 B 4-bit scales/mins + 64 B quants + d + dmin (84 B); q3_k = 32 B high bits + 64 B +
    12 B 6-bit scales + d (110 B); q4_k = d + dmin + 12 B 6-bit scales/mins of 8 sub-blocks + 128 B (144 B);
    q5_k = the same + 32 B high bits (176 B); q6_k = 128 B low bits + 64 B high bits + 16 int8 scales + d
    (210 B).
  ggml blocks run along each row (a tensor's first dimension); `tensor_bytes(..., row=)` counts them so.

Matmuls with quantised weights compute either in the activation dtype, dequantising the weights on the fly
(bytes at the stored format, FLOPs at the activation dtype's tensor peak), or natively on the tensor cores of
the format (fp8, fp4) where the hardware lists that peak and the framework runs the format natively:
`resolve_compute_dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass

from perfmodel.errors import bad_value


@dataclass(frozen=True)
class DType:
    name: str
    bits: int  # bits of one element's code
    group_size: int = 0  # integer formats: elements per scale (0: no per-group scale)
    scale_bytes: int = 0
    block_size: int = 0  # block formats: elements per block (0: not a block format)
    block_bytes: int = 0  # bytes of one whole block: codes, scales and mins
    tensor_scale_bytes: int = 0  # one per tensor (NVFP4's fp32 second-level scale)
    native: str | None = None  # peak_tflops key of tensor cores that take this format as a matmul operand
    per_row: bool = False  # one scale per row of `row` elements (per output channel of a matmul weight)

    @property
    def is_block(self) -> bool:
        return self.block_size > 0


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", 32, native="fp32"),
    "tf32": DType("tf32", 32, native="tf32"),
    "bf16": DType("bf16", 16, native="bf16"),
    "fp16": DType("fp16", 16, native="fp16"),
    "fp8": DType("fp8", 8, native="fp8"),
    "int8": DType("int8", 8, group_size=128, scale_bytes=2, native="int8"),
    "int8_channel": DType("int8_channel", 8, scale_bytes=2, per_row=True),  # weight-only: dequantised
    "int4": DType("int4", 4, group_size=128, scale_bytes=2),  # AWQ/GPTQ g128: weight-only, always dequantised
    "nvfp4": DType("nvfp4", 4, block_size=16, block_bytes=16 // 2 + 1, tensor_scale_bytes=4, native="fp4"),
    "mxfp4": DType("mxfp4", 4, block_size=32, block_bytes=32 // 2 + 1, native="fp4"),
    "q4_0": DType("q4_0", 4, block_size=32, block_bytes=2 + 16),
    "q4_1": DType("q4_1", 4, block_size=32, block_bytes=2 + 2 + 16),
    "q5_0": DType("q5_0", 5, block_size=32, block_bytes=2 + 4 + 16),
    "q5_1": DType("q5_1", 5, block_size=32, block_bytes=2 + 2 + 4 + 16),
    "q8_0": DType("q8_0", 8, block_size=32, block_bytes=2 + 32),
    "q2_k": DType("q2_k", 2, block_size=256, block_bytes=256 // 16 + 256 // 4 + 2 + 2),
    "q3_k": DType("q3_k", 3, block_size=256, block_bytes=256 // 8 + 256 // 4 + 12 + 2),
    "q4_k": DType("q4_k", 4, block_size=256, block_bytes=2 + 2 + 12 + 256 // 2),
    "q5_k": DType("q5_k", 5, block_size=256, block_bytes=2 + 2 + 12 + 256 // 8 + 256 // 2),
    "q6_k": DType("q6_k", 6, block_size=256, block_bytes=256 // 2 + 256 // 4 + 256 // 16 + 2),
}


def get_dtype(name: str, field: str = "dtype") -> DType:
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise bad_value(field, name, "|".join(DTYPES)) from None


def elements_bytes(n_elements, dtype: DType | str, row: int | None = None):
    """Bytes of n_elements (int or numpy array) inside a larger tensor: whole blocks or groups with their scales,
    no per-tensor scale. Block formats pad a partial last block; with `row`, blocks run along each row of `row`
    elements (the ggml layout) and each row's partial block is padded."""
    dt = get_dtype(dtype) if isinstance(dtype, str) else dtype
    if dt.is_block:
        blocks = -(-n_elements // dt.block_size) if row is None else (n_elements // row) * -(-row // dt.block_size)
        return blocks * dt.block_bytes
    payload = n_elements * dt.bits // 8 if dt.bits >= 8 else (n_elements * dt.bits + 7) // 8
    if dt.group_size:
        payload = payload + -(-n_elements // dt.group_size) * dt.scale_bytes
    if dt.per_row and row:
        payload = payload + (n_elements // row) * dt.scale_bytes
    return payload


def tensor_bytes(n_elements, dtype: DType | str, row: int | None = None):
    """Bytes to store one tensor of n_elements (int or numpy array) in dtype: scales included, per-tensor too."""
    dt = get_dtype(dtype) if isinstance(dtype, str) else dtype
    return elements_bytes(n_elements, dt, row) + dt.tensor_scale_bytes


def bytes_per_element(dtype: DType | str) -> float:
    """Average bytes per element for a large tensor (block and group overhead amortised)."""
    dt = get_dtype(dtype) if isinstance(dtype, str) else dtype
    if dt.is_block:
        return dt.block_bytes / dt.block_size
    extra = dt.scale_bytes / dt.group_size if dt.group_size else 0.0
    return dt.bits / 8 + extra


def resolve_compute_dtype(precision, hardware, native_formats=()) -> str:
    """The dtype whose tensor-core peak the weight matmuls run at.

    An explicit `precision.compute` wins. Otherwise the weights' format runs natively when the framework lists
    it (or its tensor-core dtype: a framework profile's native_compute, e.g. fp8, fp4) in `native_formats` and
    the hardware has a peak for that tensor-core dtype; every other case (GGUF blocks, AWQ/GPTQ int4, a format
    the framework or the chip lacks) is a dequantising GEMM at the activation dtype.
    """
    explicit = getattr(precision, "compute", None)
    if explicit:
        return explicit
    w = get_dtype(precision.weights)
    native = {str(f).lower() for f in native_formats}
    if w.native and (w.name in native or w.native in native) and w.native in hardware.peak_tflops:
        return w.native
    return precision.activations
