import numpy as np
import pytest

from perfmodel.engine.sampling import Sampler, SamplingParams, filtered_probs
from perfmodel.errors import PerfmodelError

LOGITS = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def test_greedy_is_argmax():
    lg = np.random.default_rng(0).normal(size=(4, 50))
    np.testing.assert_array_equal(Sampler(SamplingParams())(lg), lg.argmax(-1))


def test_top_k_keeps_k_most_likely():
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]])


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.8))
    np.testing.assert_allclose(p, [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]])
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.45))
    np.testing.assert_allclose(p, [[1, 0, 0, 0, 0]])


def test_temperature_sharpens_and_flattens():
    cold = filtered_probs(LOGITS, SamplingParams(temperature=0.5))
    hot = filtered_probs(LOGITS, SamplingParams(temperature=2.0))
    assert cold[0, 0] > 0.5 > hot[0, 0]


def test_sampling_is_seeded_and_follows_distribution():
    lg = np.repeat(LOGITS, 20000, axis=0)
    a = Sampler(SamplingParams(temperature=1.0, seed=7))(lg)
    b = Sampler(SamplingParams(temperature=1.0, seed=7))(lg)
    np.testing.assert_array_equal(a, b)
    freq = np.bincount(a, minlength=5) / len(a)
    np.testing.assert_allclose(freq, [0.5, 0.2, 0.15, 0.1, 0.05], atol=0.015)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_params(kw):
    with pytest.raises(PerfmodelError):
        SamplingParams(**kw)
