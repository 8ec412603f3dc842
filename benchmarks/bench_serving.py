"""serve-bench at the issue's operating points: the saturation run (every request queued at once), three
Poisson rates at 25 %, 60 % and 90 % of the measured saturation rate, and a shared-prefix run with the prefix
cache. Each stage is its own short run (python benchmarks/bench_serving.py STAGE), its JSON and records under
reports/serve-bench/; `table` prints the README table and draws the rate-sweep plot.

    python benchmarks/bench_serving.py sat          # measured saturation (requests/s with all queued)
    python benchmarks/bench_serving.py rate 0.25    # then 0.6, 0.9
    python benchmarks/bench_serving.py prefix 0.6
    python benchmarks/bench_serving.py table
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

OUT = Path("reports/serve-bench")
# the workload of every stage: real SmolLM2-135M weights, prompts of 64-256 tokens, 24 output tokens
BASE = ["--input", "uniform:64:256", "--output", "24", "--kv-blocks", "256", "--max-batch", "64"]
PREFIX = ["--input", "uniform:32:128", "--output", "24", "--kv-blocks", "256", "--max-batch", "64",
          "--shared-prefix", "128", "--prefix-cache"]


def run(name: str, args: list[str]) -> dict:
    from perfmodel.cli.app import main

    OUT.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["serve-bench", *args, "--records", str(OUT / f"{name}.records.json"), "--format", "json"])
    if rc:
        sys.exit(rc)
    r = json.loads(buf.getvalue())
    (OUT / f"{name}.json").write_text(json.dumps(r, indent=1))
    m, s, e = r["measured"], r["simulated"], r["error_pct"]
    print(f"{name}: {m['throughput_requests_per_s']:.3f} req/s measured, {s['throughput_requests_per_s']:.3f} "
          f"simulated; TTFT p50 {m['ttft_s']['p50']:.3f}/{s['ttft_s']['p50']:.3f} s ({e['ttft_p50']:+.1f} %), "
          f"TPOT p50 {m['tpot_s']['p50'] * 1e3:.1f}/{s['tpot_s']['p50'] * 1e3:.1f} ms ({e['tpot_p50']:+.1f} %), "
          f"throughput {e['throughput']:+.1f} %, host {r['host_overhead_us']:.0f} µs/step")
    return r


def saturation_rate() -> float:
    return json.loads((OUT / "sat.json").read_text())["measured"]["throughput_requests_per_s"]


def main(argv: list[str]) -> None:
    stage = argv[0] if argv else "table"
    if stage == "sat":
        run("sat", BASE + ["--rate", "1000", "--requests", "40"])
    elif stage == "rate":
        f = float(argv[1])
        n = argv[2] if len(argv) > 2 else "40"
        run(f"rate-{f:g}", BASE + ["--rate", f"{f * saturation_rate():.4f}", "--requests", n, "--seed", "1"])
    elif stage == "prefix":
        f = float(argv[1]) if len(argv) > 1 else 0.6
        run(f"prefix-{f:g}", PREFIX + ["--rate", f"{f * saturation_rate():.4f}", "--requests", "40", "--seed", "2"])
    elif stage == "table":
        table()
    else:
        sys.exit(f"unknown stage {stage!r}: sat | rate F [N] | prefix [F] | table")


def table() -> None:
    rows = []
    for p in sorted(OUT.glob("*.json")):
        if p.name.endswith(".records.json"):
            continue
        r = json.loads(p.read_text())
        rows.append((p.stem, r))
    keys = ["ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "throughput", "prefix_hit_rate"]
    print("| run | rate req/s | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, r in rows:
        m, s, e = r["measured"], r["simulated"], r["error_pct"]

        def cell(k):
            if k == "throughput":
                a, b = m["throughput_output_tokens_per_s"], s["throughput_output_tokens_per_s"]
                return f"{a:.1f} / {b:.1f} tok/s ({e[k]:+.1f} %)"
            if k == "prefix_hit_rate":
                return f"{m[k] * 100:.1f} / {s[k] * 100:.1f} % ({e[k]:+.1f} %)"
            metric, q = k.split("_")
            a, b = m[f"{metric}_s"][q], s[f"{metric}_s"][q]
            unit, f = ("ms", 1e3) if metric == "tpot" else ("s", 1)
            return f"{a * f:.3g} / {b * f:.3g} {unit} ({e[k]:+.1f} %)"
        rate = r["workload"]["rate"]
        print(f"| {name} | {rate:.3g} | " + " | ".join(cell(k) for k in keys) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
