"""Sweep throughput: request-level points per second on a 1M-point grid, against the per-point analyze()
loop in the same process (the ratio is the figure; absolute speed depends on the machine)."""

import time

import numpy as np

from perfmodel.costmodel.request import Workload, analyze
from perfmodel.costmodel.sweep import sweep
from perfmodel.specs import load_hardware, load_model


def main() -> None:
    batches, inputs, outputs = np.arange(1, 65), np.linspace(16, 8192, 128).astype(int), \
        np.linspace(2, 4096, 128).astype(int)
    for name in ("llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "deepseek-v3"):
        model, hw = load_model(name), load_hardware("h100-sxm")
        t = time.perf_counter()
        df = sweep([model], [hw], batches, inputs, outputs)
        dt = time.perf_counter() - t
        n_loop = 20
        t = time.perf_counter()
        for k in range(n_loop):
            analyze(model, hw, Workload(int(batches[k]), int(inputs[k]), int(outputs[k])))
        per_point = (time.perf_counter() - t) / n_loop
        print(f"{name:14s} {len(df):>9,} points in {dt:6.2f} s = {len(df) / dt / 1e6:5.2f} M points/s; "
              f"{(len(df) / dt) * per_point:,.0f}x the per-point analyze() loop")


if __name__ == "__main__":
    main()
