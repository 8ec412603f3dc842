"""Memory bandwidth of this machine, from large numpy operations well beyond the caches (best of N)."""

from __future__ import annotations

import time

import numpy as np


def bandwidths(nbytes: int = 256 * 2**20, repeats: int = 3) -> dict:
    """GB/s of a read (sum), a copy (read + write) and an elementwise add (two reads, one write)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.ones_like(a)
    c = np.empty_like(a)

    def best(fn):
        fn()
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    return {"read_gbps": a.nbytes / best(a.sum) / 1e9,
            "copy_gbps": 2 * a.nbytes / best(lambda: np.copyto(c, a)) / 1e9,
            "elementwise_gbps": 3 * a.nbytes / best(lambda: np.add(a, b, out=c)) / 1e9}
