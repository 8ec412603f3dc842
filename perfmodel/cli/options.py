"""Shared option parsing and checking for the CLI: lists, ranges, and one table of rules for every number.

Every command's int and float options are checked against RULES by parameter name (app.py wraps each
registered command, so a new command or option is covered with no change of its own); a name not in the table
gets the default rule: finite, >= 0 and bounded. Path options are checked for what the OS can open and, for
output paths, that they can be written. Add a line to RULES when a new option needs a tighter range.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from perfmodel.errors import PerfmodelError, short, show
from perfmodel.schemas import FLOAT_MAX, INT_MAX, TOKENS_MAX, count, number, validate

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_HARDWARE = "h100-sxm"

MAX_REQUESTS = 1_000_000  # simulated requests: the event loop runs ~1,000 a second
MAX_DEVICES = 1024  # a parallel degree
MAX_LIST = 100_000  # values in a list option other than a sweep axis

# name: (lowest, lowest is excluded, highest). Integers and floats take the same rule by their value's type.
RULES: dict[str, tuple[float, bool, float]] = {
    "batch": (1, False, TOKENS_MAX), "input": (1, False, TOKENS_MAX), "output": (1, False, TOKENS_MAX),
    "context": (1, False, TOKENS_MAX), "window": (1, False, TOKENS_MAX), "steps": (1, False, TOKENS_MAX),
    "max_new_tokens": (1, False, 2**20), "chunked_prefill": (0, False, TOKENS_MAX),
    "requests": (1, False, MAX_REQUESTS), "segments": (1, False, 10_000), "repeats": (1, False, 1000),
    "rate": (0, True, 1e9), "rates": (0, True, 1e9), "ttft": (0, True, 1e6), "tpot": (0, True, 1e6),
    "percentile": (0, True, 100), "alpha": (0, False, 1),
    "tp": (1, False, MAX_DEVICES), "pp": (1, False, MAX_DEVICES), "ep": (1, False, MAX_DEVICES),
    "dp": (1, False, MAX_DEVICES), "max_tp": (1, False, MAX_DEVICES), "max_pp": (1, False, MAX_DEVICES),
    "max_ep": (1, False, MAX_DEVICES), "gpus": (1, False, 2**20), "spare": (0, False, MAX_DEVICES),
    "gamma": (1, False, 1024), "max_batch": (1, False, 2**20), "block_tokens": (1, False, 2**16),
    "layers": (1, False, 2**11), "threads": (1, False, 4096), "seed": (0, False, 2**32 - 1),
    "temperature": (0, False, 1e3), "top_k": (0, False, INT_MAX), "top_p": (0, True, 1),
}
_DEFAULT_INT = (0, False, INT_MAX)
_DEFAULT_FLOAT = (0, False, FLOAT_MAX)


def rule_for(name: str, integer: bool):
    """The pydantic type checking option `name` (the parameter name, dashes or underscores)."""
    key = name.lstrip("-").replace("-", "_")
    lo, open_lo, hi = RULES.get(key, _DEFAULT_INT if integer else _DEFAULT_FLOAT)
    if integer:
        return count(int(lo) + (1 if open_lo else 0), int(hi))
    return number(gt=lo, le=hi) if open_lo else number(ge=lo, le=hi)


def check_number(flag: str, value: Any) -> Any:
    """A CLI number against its rule: '--batch: must be an integer in [1, 16777216], got 0'."""
    if value is None or isinstance(value, bool):
        return value
    return validate(rule_for(flag, isinstance(value, (int, np.integer))), value, flag)


# --- paths ------------------------------------------------------------------------------------------------
# role by parameter name: an existing input file, an output file, or an output folder
PATH_ROLES = {"trace": "input", "measurements": "input", "out": "output", "out_dir": "folder", "plot": "output",
              "out_root": "folder", "report_dir": "folder"}
# (command, parameter) where the name alone says the wrong thing
PATH_ROLE_OVERRIDES = {("kv-quality", "out"): "folder", ("validate", "measurements"): "input_or_builtin"}


def check_path(flag: str, path: Path, role: str = "any") -> Path:
    """One clean line for a path the OS refuses, an input that is not a file, or an output that cannot be
    written (a folder where a file goes, a file where a folder goes, no write permission)."""
    text = str(path)
    if role == "input_or_builtin":  # `--measurements builtin` names the package's published set, not a file
        if text == "builtin":
            return path
        role = "input"
    try:
        if "\0" in text:
            raise PerfmodelError(f"{flag}: {show(text)}: a path cannot contain a NUL character")
        if len(os.fsencode(text)) > 4096 or any(len(os.fsencode(p)) > 255 for p in Path(text).parts):
            raise PerfmodelError(f"{flag}: {short(text, 80)}: file name too long")
        p = Path(text)
        if role == "input":
            if p.is_dir():
                raise PerfmodelError(f"{flag}: {short(text)}: is a folder, expected a file")
            if not p.is_file():
                raise PerfmodelError(f"{flag}: {short(text)}: no such file")
            if not os.access(p, os.R_OK):
                raise PerfmodelError(f"{flag}: {short(text)}: cannot be read (permission denied)")
        elif role in ("output", "folder"):
            if role == "output" and p.is_dir():
                raise PerfmodelError(f"{flag}: {short(text)}: is a folder, expected a file name")
            if role == "folder" and p.exists() and not p.is_dir():
                raise PerfmodelError(f"{flag}: {short(text)}: is a file, expected a folder")
            if role == "output" and p.exists() and not os.access(p, os.W_OK):
                raise PerfmodelError(f"{flag}: {short(text)}: cannot be written (permission denied)")
            _check_writable_parent(flag, p if role == "folder" else p.parent)
    except OSError as e:
        raise PerfmodelError(f"{flag}: {short(text, 80)}: {e.strerror or e}") from None
    return path


def _check_writable_parent(flag: str, folder: Path) -> None:
    """The nearest existing ancestor of folder must be a folder we may write into (missing ones get created)."""
    cur = folder if str(folder) else Path(".")
    while not cur.exists():
        if cur.is_symlink():
            raise PerfmodelError(f"{flag}: {short(cur)}: is a broken link")
        if cur.parent == cur:
            break
        cur = cur.parent
    if cur.exists() and not cur.is_dir():
        raise PerfmodelError(f"{flag}: {short(cur)}: is a file, so no folder can be made inside it")
    if cur.exists() and not os.access(cur, os.W_OK | os.X_OK):
        raise PerfmodelError(f"{flag}: {short(cur)}: cannot be written (permission denied)")
    if cur.is_dir():  # os.access says yes to root everywhere (/proc, read-only mounts): try it
        try:
            tempfile.TemporaryFile(dir=cur).close()
        except OSError as e:
            raise PerfmodelError(f"{flag}: {short(cur)}: cannot be written ({e.strerror or e})") from None


# --- lists ------------------------------------------------------------------------------------------------


def int_axis(field: str, text: str) -> np.ndarray:
    """'1,8,64' or 'start:stop[:step]' (inclusive, may be mixed) as an int64 array, every value within the
    rule for field (--batch, --input, ...). Ranges are built by numpy, so 1:10000000 costs 80 MB, not 400."""
    lo, _, hi = RULES.get(field.lstrip("-").replace("-", "_"), (1, False, INT_MAX))
    lo = max(int(lo), 1)
    allowed = f"integers in [{lo}, {int(hi)}] like 1,8,64 or 1:64:8"
    parts: list[np.ndarray] = []
    try:
        for part in str(text).split(","):
            if ":" in part:
                bits = [int(x) for x in part.split(":")]
                if len(bits) not in (2, 3):
                    raise ValueError
                start, stop, step = bits[0], bits[1], bits[2] if len(bits) > 2 else 1
                if step < 1 or stop < start or start < lo or stop > hi:
                    raise PerfmodelError(f"{field}: {show(part)} is not valid; allowed: {allowed} (START <= STOP, "
                                         "STEP >= 1)")
                parts.append(np.arange(start, stop + 1, step, dtype=np.int64))
            else:
                v = int(part)
                if not lo <= v <= hi:
                    raise PerfmodelError(f"{field}: {show(text)} is not valid; allowed: {allowed}")
                parts.append(np.array([v], dtype=np.int64))
    except (ValueError, OverflowError):
        raise PerfmodelError(f"{field}: {show(text)} is not valid; allowed: {allowed}") from None
    return np.concatenate(parts)


def int_list(field: str, text: str) -> list[int]:
    """int_axis as a list of Python ints, for options that loop over their values (at most MAX_LIST)."""
    axis = int_axis(field, text)
    if len(axis) > MAX_LIST:
        raise PerfmodelError(f"{field}: {show(text)} gives {len(axis):,} values; allowed: at most {MAX_LIST:,}")
    return [int(v) for v in axis]


def float_list(field: str, text: str) -> list[float]:
    """'0.6,0.8' with every value within the rule for field."""
    out = []
    for part in name_list(text):
        try:
            v = float(part)
        except ValueError:
            v = part  # the rule reports it
        out.append(check_number(field, v))
    if not out:
        raise PerfmodelError(f"{field}: {show(text)} is not valid; allowed: numbers separated by commas")
    return out


def plain_name(flag: str, text: str) -> str:
    """A file or folder name without a path: '../x' or 'a/b' would put the output outside its folder."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", str(text)):
        raise PerfmodelError(f"{flag}: {show(text)} is not valid; allowed: letters, digits, '.', '_', '-' "
                             "(at most 64, no path)")
    return text


def name_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def names(field: str, text: str, allowed: str = "one or more names or paths separated by commas") -> list[str]:
    """name_list that refuses an empty list (',' or ' ' would otherwise run on nothing)."""
    out = name_list(text)
    if not out:
        raise PerfmodelError(f"{field}: {show(text)} is not valid; allowed: {allowed}")
    return out
