"""Streaming memory bandwidth of this machine: a large copy reads and writes every byte once."""

from __future__ import annotations

import time

import numpy as np


def stream_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-N bytes/s of a numpy copy of an array well beyond the caches (bytes read + written)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best
