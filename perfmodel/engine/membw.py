"""Memory bandwidth of this machine, read with all its threads: one figure per level of the hierarchy.

A single-threaded numpy `sum` is not a machine's bandwidth (it is bound by one core), so reads go through
PyTorch's multi-threaded reduction when torch is installed: a buffer of S bytes is summed repeatedly (for
buffers smaller than a few MB, through a stride-0 view that re-reads the same bytes many times in one call, so
the call overhead does not hide the level's speed). The sweep from 256 kB to 1 GB shows a plateau per level.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

SWEEP_BYTES = tuple(2 ** k * 1024 for k in range(8, 21))  # 256 kB .. 1 GB


def _best(fn, repeats: int, min_time: float = 0.02) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def read_sweep(sizes=SWEEP_BYTES, repeats: int = 5, threads: int | None = None) -> list[dict]:
    """All-threads read bandwidth (GB/s) of a buffer of each size: [{"bytes", "gbps", "threads", "how"}]."""
    try:
        import torch
    except ImportError:
        torch = None
    threads = threads or os.cpu_count() or 1
    out = []
    for size in sizes:
        n = size // 4
        if torch is not None:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            x = torch.ones(n, dtype=torch.float32)
            reps = max(1, (64 << 20) // size)
            v = x.as_strided((reps, n), (0, 1)) if reps > 1 else x
            t = _best(lambda: v.sum(), repeats)
            torch.set_num_threads(prev)
            out.append({"bytes": size, "gbps": reps * size / t / 1e9, "threads": threads, "how": "torch sum"})
        else:  # one core only: a floor, said so
            x = np.ones(n, dtype=np.float32)
            t = _best(lambda: x.sum(), repeats)
            out.append({"bytes": size, "gbps": size / t / 1e9, "threads": 1, "how": "numpy sum"})
    return out


def levels_from_sweep(sweep: list[dict], caches: dict[str, int]) -> tuple[list[dict], float]:
    """(on-chip levels, main-memory GB/s) from a read sweep and the cache sizes (bytes, all cores together).
    A level's bandwidth is the median of the sweep points that fit in half of it and not in the level below;
    main memory's, the median of the points at least four times the last level."""
    levels, below = [], 0
    for name in sorted(caches, key=lambda k: caches[k]):
        cap = caches[name]
        pts = [p["gbps"] for p in sweep if below < p["bytes"] <= cap / 2]
        if pts:
            levels.append({"name": name, "capacity_mb": round(cap / 2**20, 3), "bandwidth_gbps":
                           round(statistics.median(pts), 1)})
        below = cap
    last = max(caches.values(), default=0)
    far = [p["gbps"] for p in sweep if p["bytes"] >= 4 * last] or [sweep[-1]["gbps"]]
    return levels, round(statistics.median(far), 2)


def bandwidths(nbytes: int = 256 * 2**20, repeats: int = 3) -> dict:
    """GB/s of an all-threads read, and of numpy's copy (read + write) and elementwise add (two reads, one
    write) over nbytes, well beyond the caches."""
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

    read = read_sweep((nbytes,), repeats=repeats)[0]["gbps"]
    return {"read_gbps": read, "copy_gbps": 2 * a.nbytes / best(lambda: np.copyto(c, a)) / 1e9,
            "elementwise_gbps": 3 * a.nbytes / best(lambda: np.add(a, b, out=c)) / 1e9}
