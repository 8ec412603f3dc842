"""Serving workloads: request lengths (fixed, distributions, or a CSV trace) and arrival rate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from perfmodel.errors import PerfmodelError


@dataclass(frozen=True)
class LengthDist:
    """'512' (fixed), 'uniform:128:2048', 'normal:512:128', 'lognormal:512:0.6' (median, sigma)."""

    kind: str
    a: float
    b: float = 0.0

    @staticmethod
    def parse(field: str, text: str) -> "LengthDist":
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                return LengthDist("fixed", float(parts[0]))
            if parts[0] in ("uniform", "normal", "lognormal") and len(parts) == 3:
                return LengthDist(parts[0], float(parts[1]), float(parts[2]))
        except ValueError:
            pass
        raise PerfmodelError(f"{field}: {text!r} is not valid; allowed: N, uniform:LO:HI, normal:MEAN:STD, "
                             "lognormal:MEDIAN:SIGMA")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.uniform(self.a, self.b, n)
        elif self.kind == "normal":
            x = rng.normal(self.a, self.b, n)
        else:
            x = self.a * np.exp(rng.normal(0.0, self.b, n))
        return np.maximum(np.rint(x), 1).astype(np.int64)


@dataclass
class Requests:
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)


def poisson_requests(rate: float, n: int, inp: LengthDist, out: LengthDist, seed: int = 0) -> Requests:
    if rate <= 0:
        raise PerfmodelError(f"--rate: {rate} is not valid; allowed: requests per second > 0")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    return Requests(arrivals, inp.sample(n, rng), out.sample(n, rng))


def trace_requests(path: Path) -> Requests:
    """CSV with arrival_s (or timestamp), input_tokens, output_tokens (or input, output)."""
    if not Path(path).is_file():
        raise PerfmodelError(f"--trace: {path} not found")
    df = pd.read_csv(path)
    cols = {c.lower(): c for c in df.columns}
    pick = lambda *names: next((cols[n] for n in names if n in cols), None)  # noqa: E731
    a, i, o = pick("arrival_s", "timestamp", "arrival"), pick("input_tokens", "input"), pick("output_tokens", "output")
    if not (a and i and o):
        raise PerfmodelError(f"--trace: {path} needs columns arrival_s, input_tokens, output_tokens")
    df = df.sort_values(a)
    t = df[a].to_numpy(dtype=float)
    return Requests(t - t[0], df[i].to_numpy(dtype=np.int64), df[o].to_numpy(dtype=np.int64))
