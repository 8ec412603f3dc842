"""Storage size of each numeric format, with the scale overhead of integer formats counted.

Integer formats (int8, int4) carry one fp16 scale per group of 128 elements, the common
group-wise weight quantisation layout (GPTQ/AWQ style). Float formats carry no per-group metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from perfmodel.errors import bad_value


@dataclass(frozen=True)
class DType:
    name: str
    bits: int
    group_size: int = 0  # 0: no per-group scale
    scale_bytes: int = 0


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", 32),
    "tf32": DType("tf32", 32),
    "bf16": DType("bf16", 16),
    "fp16": DType("fp16", 16),
    "fp8": DType("fp8", 8),
    "int8": DType("int8", 8, group_size=128, scale_bytes=2),
    "int4": DType("int4", 4, group_size=128, scale_bytes=2),
}


def get_dtype(name: str, field: str = "dtype") -> DType:
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise bad_value(field, name, "|".join(DTYPES)) from None


def tensor_bytes(n_elements, dtype: DType | str):
    """Bytes to store n_elements (int or numpy array) in dtype, scales included."""
    dt = get_dtype(dtype) if isinstance(dtype, str) else dtype
    payload = n_elements * dt.bits // 8 if dt.bits >= 8 else (n_elements * dt.bits + 7) // 8
    if dt.group_size:
        payload = payload + -(-n_elements // dt.group_size) * dt.scale_bytes
    return payload


def bytes_per_element(dtype: DType | str) -> float:
    """Average bytes per element for a large tensor (scale overhead amortised)."""
    dt = get_dtype(dtype) if isinstance(dtype, str) else dtype
    extra = dt.scale_bytes / dt.group_size if dt.group_size else 0.0
    return dt.bits / 8 + extra

