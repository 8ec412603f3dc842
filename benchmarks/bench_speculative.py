"""Speculative decoding on the real SmolLM2-135M weights: measured α and decode speed-up against the cost model.

Plain and speculative decoding of the same prompt run in one process (NumPy fp32 target; prompt lookup, and the
target's int8 copy on torch as draft). Target of issue 12: for each drafter at its best γ, the predicted
speed-up (measured α, this machine's calibrated hardware) is within 15 % of the measured one. Run it alone on
the machine (timing): `python benchmarks/bench_speculative.py --gamma 3,5,7 --repeats 3`.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gamma", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--hardware", default=None, help="calibrated YAML (default: the newest hardware/local-*.yaml)")
    args = ap.parse_args()

    from perfmodel.cli.validation_commands import _newest_local
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.quantised import int8_model
    from perfmodel.engine.transformer import Transformer
    from perfmodel.specs import load_hardware
    from perfmodel.validation.speculative import best_rows, measure

    hw = load_hardware(args.hardware) if args.hardware else _newest_local()
    spec, weights, tok = load_engine_model("smollm2-135m")
    target = Transformer(spec, weights, make_backend("numpy"))
    rows = measure(target, tok, int8_model(spec, weights), hw, [int(g) for g in args.gamma.split(",")],
                   args.max_new_tokens, repeats=args.repeats)
    print(f"{'prompt':10} {'drafter':7} {'γ':>2} {'α':>5} {'tok/step':>8} {'measured':>8} {'predicted':>9} {'error':>7}")
    for r in rows:
        print(f"{r['prompt']:10} {r['drafter']:7} {r['gamma']:>2} {r['acceptance_rate']:5.2f} "
              f"{r['tokens_per_target_step']:8.2f} {r['measured_speedup']:7.2f}x {r['predicted_speedup']:8.2f}x "
              f"{r['error_pct']:+6.1f}%")
    ok = True
    for r in best_rows(rows):
        hit = abs(r["error_pct"]) <= 15
        ok &= hit
        print(f"best γ {r['prompt']}/{r['drafter']}: γ={r['gamma']} measured {r['measured_speedup']:.2f}x predicted "
              f"{r['predicted_speedup']:.2f}x ({r['error_pct']:+.1f} %) {'ok' if hit else 'MISS (target 15 %)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
