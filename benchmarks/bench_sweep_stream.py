"""Streamed sweep to a file: points/s and peak RSS for grids of growing size (every batch distinct, the
slowest case). The peak must stay flat as the grid grows; the figures go in the README.

    python benchmarks/bench_sweep_stream.py [max_batches]   (default 1,000,000: up to 6 M points per format)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
import pandas, pyarrow.parquet  # imports outside the timing
from perfmodel.cli.app import main
from perfmodel.cli import cost_commands
t = time.perf_counter()
rc = main(["sweep", "--batch", "1:" + sys.argv[1], "--out", sys.argv[2], "--format", "json"])
print(json.dumps({"rc": rc, "s": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as d:
        for suffix in (".parquet", ".csv"):
            n = 100_000  # 600 k points: past the print budget, so only the file holds the rows
            while n <= top:
                out = Path(d) / f"grid{suffix}"
                r = subprocess.run([sys.executable, "-c", CHILD, str(n), str(out)], capture_output=True, text=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                points = 6 * n  # default --input (3) x --output (2)
                print(f"{suffix:8s} {points:>11,} points: {points / res['s'] / 1e6:5.2f} M points/s, "
                      f"peak RSS {res['rss_mb']:6.0f} MB, {out.stat().st_size / 1e9:6.2f} GB")
                out.unlink()
                n *= 10


if __name__ == "__main__":
    main()
