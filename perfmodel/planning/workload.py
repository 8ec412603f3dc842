"""Serving workloads: request lengths (fixed, distributions, or a CSV trace) and arrival rate.

Every input is validated before anything is sampled or simulated: distribution parameters and trace columns
through the schema rules (perfmodel.schemas), so 'lognormal:1500:-1', 'uniform:10:1', an empty trace, a NaN
arrival or a negative length is one error line, never a NumPy error or a nonsense plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfmodel.errors import PerfmodelError, short, show
from perfmodel.schemas import (TOKENS_MAX, count, is_dir, is_file, number, read_csv_strings, validate,
                               validate_column)

MAX_REQUESTS = 10_000_000
MAX_SIGMA = 5.0  # lognormal sigma: at 5 the p90 length is already 600x the median
_LENGTH = number(ge=1, le=TOKENS_MAX)
_SPREAD = number(ge=0, le=TOKENS_MAX)
_TOKENS = count(1, TOKENS_MAX)
# kind: the parameters after the kind, each with its rule
_KINDS = {"uniform": (("LO", _LENGTH), ("HI", _LENGTH)), "normal": (("MEAN", _LENGTH), ("STD", _SPREAD)),
          "lognormal": (("MEDIAN", _LENGTH), ("SIGMA", number(ge=0, le=MAX_SIGMA)))}
_SYNTAX = "N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEDIAN:SIGMA"


@dataclass(frozen=True)
class LengthDist:
    """'512' (fixed), 'uniform:128:2048', 'normal:512:128', 'lognormal:512:0.6' (median, sigma).
    Samples are rounded and kept within [1, TOKENS_MAX] tokens."""

    kind: str
    a: float
    b: float = 0.0

    @staticmethod
    def parse(field: str, text: str) -> "LengthDist":
        parts = str(text).split(":")
        where = f"{field}: {show(text)}"
        if len(parts) == 1:
            return LengthDist("fixed", validate(_LENGTH, parts[0].strip(), f"{where}: N"))
        if parts[0] not in _KINDS or len(parts) != 3:
            raise PerfmodelError(f"{field}: {show(text)} is not valid; allowed: {_SYNTAX}")
        (na, ra), (nb, rb) = _KINDS[parts[0]]
        a = validate(ra, parts[1].strip(), f"{where}: {na}")
        b = validate(rb, parts[2].strip(), f"{where}: {nb}")
        if parts[0] == "uniform" and b < a:
            raise PerfmodelError(f"{where}: HI: must be >= LO ({a:g}), got {b:g}")
        return LengthDist(parts[0], a, b)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        n = validate(count(0, MAX_REQUESTS), n, "requests")
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.uniform(self.a, self.b, n)
        elif self.kind == "normal":
            x = rng.normal(self.a, self.b, n)
        elif self.kind == "lognormal":
            x = self.a * np.exp(rng.normal(0.0, self.b, n))
        else:
            raise PerfmodelError(f"length distribution: {show(self.kind)}; allowed: fixed, {', '.join(_KINDS)}")
        return np.clip(np.rint(x), 1, TOKENS_MAX).astype(np.int64)


@dataclass
class Requests:
    arrival_s: np.ndarray
    input_tokens: np.ndarray  # the whole prompt, shared prefix included
    output_tokens: np.ndarray
    prefix_tokens: np.ndarray | None = None  # leading prompt tokens every request shares (a system prompt)

    def __len__(self) -> int:
        return len(self.arrival_s)

    def shared_prefix(self) -> np.ndarray:
        """Per request, how many leading prompt tokens are the workload's shared prefix (0: none)."""
        if self.prefix_tokens is None:
            return np.zeros(len(self), dtype=np.int64)
        return np.asarray(self.prefix_tokens, dtype=np.int64)

    def with_shared_prefix(self, tokens: int) -> "Requests":
        """The same requests with a `tokens`-token system prompt in front of every prompt."""
        tokens = validate(count(0, TOKENS_MAX), tokens, "--shared-prefix")
        return Requests(self.arrival_s, self.input_tokens + tokens - self.shared_prefix(), self.output_tokens,
                        np.full(len(self), tokens, dtype=np.int64))

    def check(self, where: str = "requests") -> "Requests":
        """Refuse what no simulation can run: no requests, too many, NaN or decreasing arrivals, lengths
        outside [1, TOKENS_MAX] (a check of arrays already built; traces are validated row by row on read)."""
        n = len(self.arrival_s)
        if n == 0:
            raise PerfmodelError(f"{where}: no requests")
        if n > MAX_REQUESTS:
            raise PerfmodelError(f"{where}: {n:,} requests; allowed: at most {MAX_REQUESTS:,}")
        if not (len(self.input_tokens) == len(self.output_tokens) == n):
            raise PerfmodelError(f"{where}: arrival, input and output columns differ in length")
        for name, col, rule in (("arrival_s", self.arrival_s, number(ge=0)), ("input_tokens", self.input_tokens,
                                _TOKENS), ("output_tokens", self.output_tokens, _TOKENS)):
            validate_column(np.asarray(col).tolist(), rule, where, name)
        if n > 1 and np.any(np.diff(self.arrival_s) < 0):
            raise PerfmodelError(f"{where}: arrival_s: must be sorted in time")
        if self.prefix_tokens is not None:
            pre = self.shared_prefix()
            if len(pre) != n or (pre < 0).any() or (pre > self.input_tokens).any():
                raise PerfmodelError(f"{where}: prefix_tokens: must be in [0, input_tokens] for every request")
        return self


def poisson_requests(rate: float, n: int, inp: LengthDist, out: LengthDist, seed: int = 0) -> Requests:
    rate = validate(number(gt=0, le=1e9), rate, "--rate")
    n = validate(count(1, MAX_REQUESTS), n, "--requests")
    seed = validate(count(0, 2**32 - 1), seed, "--seed")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    return Requests(arrivals, inp.sample(n, rng), out.sample(n, rng))


def trace_requests(path: Path) -> Requests:
    """CSV with arrival_s (or timestamp), input_tokens, output_tokens (or input, output); every row checked."""
    where = short(path)
    if is_dir(path):
        raise PerfmodelError(f"--trace: {where}: is a folder, expected a CSV file")
    if not is_file(path):
        raise PerfmodelError(f"--trace: {where} not found")
    df = read_csv_strings(path, f"--trace: {where}")
    cols = {str(c).strip().lower(): c for c in df.columns}
    pick = lambda *names: next((cols[n] for n in names if n in cols), None)  # noqa: E731
    a, i, o = pick("arrival_s", "timestamp", "arrival"), pick("input_tokens", "input"), pick("output_tokens", "output")
    if not (a and i and o):
        raise PerfmodelError(f"--trace: {where} needs columns arrival_s, input_tokens, output_tokens")
    if len(df) == 0:
        raise PerfmodelError(f"--trace: {where}: no requests (a header and no rows)")
    if len(df) > MAX_REQUESTS:
        raise PerfmodelError(f"--trace: {where}: {len(df):,} requests; allowed: at most {MAX_REQUESTS:,}")
    # row numbers as in a spreadsheet: the header is row 1
    t = np.asarray(validate_column(df[a].tolist(), number(ge=0, le=1e12), f"--trace: {where}", a, 2))
    inp = np.asarray(validate_column(df[i].tolist(), _TOKENS, f"--trace: {where}", i, 2), dtype=np.int64)
    out = np.asarray(validate_column(df[o].tolist(), _TOKENS, f"--trace: {where}", o, 2), dtype=np.int64)
    pre = None
    p = pick("prefix_tokens", "shared_prefix")
    if p:  # optional: how many leading tokens of each prompt are the shared system prompt
        pre = np.asarray(validate_column(df[p].tolist(), count(0, TOKENS_MAX), f"--trace: {where}", p, 2),
                         dtype=np.int64)
        bad = np.nonzero(pre > inp)[0]
        if len(bad):
            raise PerfmodelError(f"--trace: {where}: row {int(bad[0]) + 2}: {p}: must be <= {i} "
                                 f"({int(inp[bad[0]])}), got {int(pre[bad[0]])}")
    order = np.argsort(t, kind="stable")
    t = t[order]
    return Requests(t - t[0], inp[order], out[order], None if pre is None else pre[order])
