"""KV-cache compression methods and their parameters: `perfmodel analyze --kv-prune per-token:0.7` etc.

Spellings: dense | per-token:S[:output] | per-channel:S[:output] | kivi:BITS | h2o:S | streaming:S, where S is
the sparsity (fraction of the old tokens' elements dropped, or of the old tokens evicted for h2o/streaming);
K and V take the same S unless written S_K/S_V (per-token:0.7/0.5). Every method keeps the newest `window`
tokens dense (32 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from perfmodel.errors import PerfmodelError, show

KINDS = ("dense", "per-token", "per-channel", "kivi", "h2o", "streaming")


@dataclass(frozen=True)
class KVMethod:
    kind: str = "dense"
    k_sparsity: float = 0.0
    v_sparsity: float = 0.0
    score: str = "magnitude"  # magnitude | output (|K|*sum|q|, |V|*sum attention)
    bits: int = 4  # kivi
    group: int = 32  # kivi quantisation group
    window: int = 32  # newest tokens kept dense
    sinks: int = 4  # streaming

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "kivi":
            return f"kivi-{self.bits}bit"
        s = f"{self.k_sparsity:g}" if self.k_sparsity == self.v_sparsity else f"{self.k_sparsity:g}/{self.v_sparsity:g}"
        extra = f":{self.score}" if self.kind in ("per-token", "per-channel") and self.score != "magnitude" else ""
        return f"{self.kind}:{s}{extra}"

    @staticmethod
    def parse(text: str, window: int = 32, field: str = "--kv-prune") -> "KVMethod":
        bad = PerfmodelError(f"{field}: {show(text)} is not valid; allowed: dense, per-token:S[:output], "
                             "per-channel:S[:output], kivi:2|4, h2o:S, streaming:S (S in [0, 1), K/V as SK/SV)")
        parts = str(text).split(":")
        kind = parts[0]
        if kind not in KINDS:
            raise bad
        if kind == "dense":
            return KVMethod(window=window)
        if len(parts) < 2:
            raise bad
        if kind == "kivi":
            if parts[1] not in ("2", "4"):
                raise bad
            return KVMethod("kivi", bits=int(parts[1]), window=window)
        try:
            sk, _, sv = parts[1].partition("/")
            k, v = float(sk), float(sv or sk)
        except ValueError:
            raise bad from None
        if not (0 <= k < 1 and 0 <= v < 1):
            raise bad
        score = parts[2] if len(parts) > 2 else "magnitude"
        if score not in ("magnitude", "output") or (score == "output" and kind not in ("per-token", "per-channel")):
            raise bad
        return KVMethod(kind, k, v, score, window=window)
