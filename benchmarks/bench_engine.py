"""Reference engine speed on the real SmolLM2-135M weights (fp32, batch 1), in one process.

For each engine variant (NumPy and Torch, eager and fused operator structures, and Torch under torch.compile)
it measures prefill of a prompt and decode ms/token, and prints two ratios:
- against Hugging Face transformers eager, run on the same weights in the same process;
- against the memory roofline: the decode step's bytes (weights + KV cache read) divided by the best
  all-threads streaming read of this machine (PyTorch's multi-threaded sum over 256 MB and 1 GB buffers, the
  best of several tries, measured in the same process; a single-threaded numpy sum is not the machine's roof).
Targets of issue 9: the fastest variant reaches >= 50 % of the roofline and is >= 2x transformers eager.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (~1 min compile)")
    args = ap.parse_args()

    import torch

    from perfmodel.costmodel.operators import Precision, phase_ops
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.membw import read_sweep
    from perfmodel.engine.transformer import KVCache, Transformer

    spec, weights, tok = load_engine_model("smollm2-135m")
    ids = np.random.default_rng(0).integers(100, 40000, (1, args.prompt + args.decode))
    results = {}

    def ours(backend, structure="eager", flash=False, compiled=None):
        m = Transformer(spec, weights, make_backend(backend, "fp32"), flash=flash, structure=structure)
        fwd = m.forward
        if compiled:
            from perfmodel.engine.compiled import compiled_forward

            fwd = compiled_forward(m, compiled)
        cache = KVCache(m.be, spec, 1, args.prompt + args.decode + 1)

        def prefill():
            cache.length = 0
            fwd(ids[:, :args.prompt], cache)

        def decode():
            cache.length = args.prompt
            for t in range(args.decode):
                fwd(ids[:, args.prompt + t:args.prompt + t + 1], cache)

        with torch.inference_mode():
            pre = timed(prefill, max(1, args.repeats // 2))
            return pre, timed(decode, args.repeats) / args.decode

    variants = [("numpy eager", ("numpy",)), ("numpy fused", ("numpy", "fused")),
                ("torch eager", ("torch", "eager", True)), ("torch fused", ("torch", "fused", True))]
    if not args.no_compile:
        variants.append(("torch fused, compiled", ("torch", "fused", True, "fused")))
    for name, a in variants:
        results[name] = ours(*a)

    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from perfmodel.engine.weights import smollm2_gguf_path

    p = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tids = torch.as_tensor(ids[:, :args.prompt])

    def hf_prefill():
        return hf(tids, use_cache=True)

    def hf_decode():
        cache = DynamicCache()
        hf(tids, past_key_values=cache, use_cache=True)
        n = cache.get_seq_length()
        t0 = time.perf_counter()
        for t in range(args.decode):
            hf(torch.as_tensor(ids[:, args.prompt + t:args.prompt + t + 1]), past_key_values=cache, use_cache=True,
               cache_position=torch.tensor([n + t]))
        return time.perf_counter() - t0

    with torch.inference_mode():
        pre = timed(hf_prefill, max(1, args.repeats // 2))
        hf_decode()
        dec = statistics.median(hf_decode() for _ in range(args.repeats)) / args.decode
    results["transformers eager"] = (pre, dec)

    # the roof: the best all-threads streaming read, several tries, large buffers (DRAM)
    reads = [p["gbps"] for _ in range(3) for p in read_sweep((256 * 2**20, 1024 * 2**20), repeats=3)]
    bw = max(reads) * 1e9
    p32 = Precision("fp32", "fp32", "fp32")
    step_bytes = sum(int(o.weight_bytes + o.kv_read_bytes) * o.layers
                     for o in phase_ops(spec, 1, 1, args.prompt + args.decode // 2, p32))
    roof = step_bytes / bw
    print(f"SmolLM2-135M fp32, batch 1, prompt {args.prompt}, {args.decode} decode steps, "
          f"{torch.get_num_threads()} threads")
    print(f"all-threads streaming read: best {max(reads):.1f} GB/s (tries: {', '.join(f'{r:.1f}' for r in reads)})")
    print(f"memory roofline: {step_bytes / 1e6:.1f} MB per decode step / {bw / 1e9:.1f} GB/s = "
          f"{roof * 1e3:.2f} ms/token")
    hf_dec = results["transformers eager"][1]
    for name, (pre, dec) in results.items():
        print(f"{name:24s} prefill {pre * 1e3:8.1f} ms   decode {dec * 1e3:7.2f} ms/token   "
              f"{hf_dec / dec:5.2f}x transformers   {roof / dec * 100:5.1f} % of the roofline")
    best = min((v[1], k) for k, v in results.items() if k != "transformers eager")
    print(f"fastest: {best[1]}: {hf_dec / best[0]:.2f}x transformers (target >= 2), "
          f"{roof / best[0] * 100:.1f} % of the roofline (target >= 50 %)")


if __name__ == "__main__":
    main()
