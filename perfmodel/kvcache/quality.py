"""KV-compression quality on real weights: prefill a context, then teacher-force the following tokens one at
a time through the compressed cache, against the same run through the dense cache.

Metrics per method: perplexity of the forced tokens (and its change), KL(dense || compressed) of the next-token
distributions, top-1 agreement, relative error of every layer's attention output, and the cache's measured
bytes against dense (and against the cost model's formula, which must be equal).
"""

from __future__ import annotations

import numpy as np

from perfmodel.kvcache.cache import CompressedKVCache
from perfmodel.kvcache.methods import KVMethod

DEFAULT_METHODS = [f"{kind}:{s}{score}" for kind in ("per-token", "per-channel") for score in ("", ":output")
                   for s in (0.3, 0.5, 0.7, 0.9)] + ["kivi:4", "kivi:2"] + \
                  [f"{k}:{s}" for k in ("h2o", "streaming") for s in (0.3, 0.5, 0.7, 0.9)]


def english_tokens(tok, n: int, offset: int = 0) -> np.ndarray:
    """Token ids of English prose from the standard library's pydoc_data.topics (the Python docs)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text[offset:offset + 8 * n])
    if len(ids) < n:
        raise ValueError("not enough text")
    return np.asarray(ids[:n], dtype=np.int64)


def _run(model, ids: np.ndarray, context: int, steps: int, method: KVMethod):
    be, spec = model.be, model.spec
    cache = CompressedKVCache(be, spec, 1, context + steps + 1, method)
    logits = [model.forward(ids[None, :context], cache)[0, -1]]
    cache.capture = []
    for t in range(steps):
        logits.append(model.forward(ids[None, context + t:context + t + 1], cache)[0, -1])
    return np.stack(logits), cache.capture, cache


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate(model, tok, methods: list[str], context: int = 512, steps: int = 64, segments: int = 1,
             window: int = 32, progress=None) -> list[dict]:
    from perfmodel.costmodel.kv_compression import kv_stored_bytes

    rows: dict = {}
    for seg in range(segments):
        ids = english_tokens(tok, context + steps + 1, offset=seg * 40_000)
        targets = ids[context:context + steps + 1]
        dense_logits, dense_out, dense_cache = _run(model, ids, context, steps, KVMethod(window=window))
        ld = _log_softmax(dense_logits.astype(np.float64))
        nll_dense = -ld[np.arange(len(targets)), targets].mean()
        for name in ["dense"] + methods:
            method = KVMethod.parse(name, window)
            if name == "dense":
                lg, outs, cache = dense_logits, dense_out, dense_cache
            else:
                lg, outs, cache = _run(model, ids, context, steps, method)
            lm = _log_softmax(lg.astype(np.float64))
            nll = -lm[np.arange(len(targets)), targets].mean()
            kl = (np.exp(ld) * (ld - lm)).sum(axis=-1).mean()
            top1 = (ld.argmax(-1) == lm.argmax(-1)).mean()
            errs = [np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12) for o, r in zip(outs, dense_out)]
            measured = cache.stored_bytes()
            predicted = int(kv_stored_bytes(model.spec, method, cache.length, 1, "fp32"))
            r = rows.setdefault(name, {"method": name, "nll": [], "nll_dense": [], "kl": [], "top1": [],
                                       "attn_err": [], "bytes": measured, "dense_bytes": dense_cache.stored_bytes(),
                                       "model_bytes": predicted})
            for k, v in (("nll", nll), ("nll_dense", nll_dense), ("kl", kl), ("top1", top1),
                         ("attn_err", float(np.mean(errs)))):
                r[k].append(float(v))
            if progress:
                progress(name)
    out = []
    for name, r in rows.items():
        ppl, ppl_d = float(np.exp(np.mean(r["nll"]))), float(np.exp(np.mean(r["nll_dense"])))
        out.append({"method": name, "perplexity": ppl, "perplexity_change_pct": (ppl / ppl_d - 1) * 100,
                    "kl_divergence": float(np.mean(r["kl"])), "top1_agreement": float(np.mean(r["top1"])),
                    "attention_rel_error": float(np.mean(r["attn_err"])), "kv_bytes": r["bytes"],
                    "kv_fraction_of_dense": r["bytes"] / r["dense_bytes"], "model_kv_bytes": r["model_bytes"]})
    return out
