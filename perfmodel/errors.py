"""One exception type for every user-facing input problem; the CLI turns it into one line and exit code 2."""

from __future__ import annotations

SHOW_MAX = 80  # characters of a bad value echoed back (a 5,000-character path must not flood the terminal)


class PerfmodelError(ValueError):
    """Bad user input: the message names the field and what is allowed."""


def show(value: object, limit: int = SHOW_MAX) -> str:
    """A bad value as the user would recognise it, on one line and cut to a readable length."""
    text = repr(value) if isinstance(value, str) else str(value)
    return _cut(" ".join(text.split()), limit)


def short(text: object, limit: int = 200) -> str:
    """A name (a file path) on one line, unquoted, cut to a readable length."""
    return _cut(" ".join(str(text).split()), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bad_value(field: str, value: object, allowed: object) -> PerfmodelError:
    return PerfmodelError(f"{field}: {show(value)} is not valid; allowed: {allowed}")


def one_line(message: object, limit: int = 1000) -> str:
    """A message folded to one line (the CLI's contract: one line per error)."""
    return _cut(" ".join(str(message).split()), limit)
