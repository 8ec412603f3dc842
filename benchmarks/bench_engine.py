"""Reference engine speed on the real SmolLM2-135M weights, in one process:
prefill of 512 tokens and decode ms/token for our NumPy and Torch backends, Hugging Face transformers eager,
and the memory roofline (bytes a decode step must read / measured streaming bandwidth)."""

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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from perfmodel.costmodel.operators import Precision, phase_ops
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.membw import bandwidths
    from perfmodel.engine.transformer import KVCache, Transformer

    spec, weights, tok = load_engine_model("smollm2-135m")
    ids = np.random.default_rng(0).integers(100, 40000, (1, args.prompt))
    torch.set_num_threads(torch.get_num_threads())
    results = {}

    def ours(backend):
        m = Transformer(spec, weights, make_backend(backend, "fp32"))
        cache = KVCache(m.be, spec, 1, args.prompt + args.decode + 1)

        def prefill():
            cache.length = 0
            m.forward(ids, cache)

        def decode():
            cache.length = args.prompt
            for t in range(args.decode):
                m.forward(ids[:, t:t + 1], cache)

        with torch.inference_mode():
            return timed(prefill, args.repeats), timed(decode, args.repeats) / args.decode

    for backend in ("numpy", "torch"):
        results[backend] = ours(backend)

    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from perfmodel.engine.weights import smollm2_gguf_path

    p = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tids = torch.as_tensor(ids)

    def hf_prefill():
        return hf(tids, use_cache=True)

    def hf_decode():
        cache = DynamicCache()
        hf(tids, past_key_values=cache, use_cache=True)
        n = cache.get_seq_length()
        t0 = time.perf_counter()
        for t in range(args.decode):
            hf(tids[:, t:t + 1], past_key_values=cache, use_cache=True,
               cache_position=torch.tensor([n + t]))
        return time.perf_counter() - t0

    with torch.inference_mode():
        pre = timed(hf_prefill, args.repeats)
        hf_decode()
        dec = statistics.median(hf_decode() for _ in range(args.repeats)) / args.decode
    results["transformers eager"] = (pre, dec)

    bw = bandwidths(512 * 2**20, repeats=5)["copy_gbps"] * 1e9
    p32 = Precision("fp32", "fp32", "fp32")
    step_bytes = sum(int(o.weight_bytes + o.kv_read_bytes) * o.layers
                     for o in phase_ops(spec, 1, 1, args.prompt + args.decode // 2, p32))
    roof = step_bytes / bw
    print(f"SmolLM2-135M fp32, prompt {args.prompt}, {args.decode} decode steps, {torch.get_num_threads()} threads")
    print(f"memory roofline: {step_bytes / 1e6:.1f} MB per decode step / {bw / 1e9:.1f} GB/s = {roof * 1e3:.2f} ms/token")
    hf_dec = results["transformers eager"][1]
    for name, (pre, dec) in results.items():
        print(f"{name:20s} prefill {pre * 1e3:8.1f} ms   decode {dec * 1e3:7.2f} ms/token   "
              f"{hf_dec / dec:5.2f}x transformers   {dec / roof:5.2f}x the roofline")


if __name__ == "__main__":
    main()
