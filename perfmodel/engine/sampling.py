"""Token sampling: greedy, temperature, top-k, top-p; seeded and reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfmodel.errors import bad_value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise bad_value("--temperature", self.temperature, "a number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise bad_value("--top-k", self.top_k, "an integer >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            raise bad_value("--top-p", self.top_p, "a number in (0, 1]")


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Row-wise probabilities after temperature, top-k and top-p (nucleus) filtering."""
    z = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < z.shape[-1]:
        kth = np.partition(z, -p.top_k, axis=-1)[..., -p.top_k][..., None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if p.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < p.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] -> token ids [batch]."""
        if self.params.temperature == 0:
            return np.argmax(logits, axis=-1)
        probs = filtered_probs(logits, self.params)
        u = self.rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)
