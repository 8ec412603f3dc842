"""Shared option parsing for the CLI: lists, dtypes, formats."""

from __future__ import annotations

from perfmodel.errors import PerfmodelError

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_HARDWARE = "h100-sxm"


def int_list(field: str, text: str) -> list[int]:
    """'1,8,64' or 'start:stop[:step]' (inclusive), every value >= 1."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            if ":" in part:
                bits = [int(x) for x in part.split(":")]
                start, stop = bits[0], bits[1]
                step = bits[2] if len(bits) > 2 else 1
                out += list(range(start, stop + 1, step))
            else:
                out.append(int(part))
    except (ValueError, IndexError):
        raise PerfmodelError(f"{field}: {text!r} is not valid; allowed: integers like 1,8,64 or 1:64:8") from None
    if not out or min(out) < 1:
        raise PerfmodelError(f"{field}: {text!r} is not valid; allowed: integers >= 1")
    return out


def name_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]
