import numpy as np
import pytest

from conftest import needs_torch, needs_weights, small
from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.speculative import draft_ops, verify_ops
from perfmodel.engine.backend import make_backend
from perfmodel.engine.generate import generate
from perfmodel.engine.loading import truncate
from perfmodel.engine.sampling import SamplingParams, filtered_probs
from perfmodel.engine.speculative import ModelDrafter, NgramDrafter, speculative_generate
from perfmodel.engine.tracer import Tracer
from perfmodel.engine.transformer import KVCache, Transformer
from perfmodel.engine.weights import random_weights
from perfmodel.validation.counts import compare_forwards

SPEC = small("smollm2-135m")
PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 5, 6]


def _target(seed=1, tracer=None, std=0.3):
    return Transformer(SPEC, random_weights(SPEC, seed, std=std), make_backend("numpy"), tracer=tracer)


def _looping(tracer=None):
    """A random model whose greedy output falls into runs: prompt lookup then both hits and misses."""
    return _target(5, tracer, std=0.1)


def _plain(m, prompt, n):
    return generate(m, [prompt], n, SamplingParams()).tokens[0].tolist()


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_ngram_equals_plain_greedy(gamma):
    for m in (_target(), _looping()):
        want = _plain(m, PROMPT, 30)
        got = speculative_generate(m, NgramDrafter(3), PROMPT, 30, gamma, SamplingParams())
        assert got.tokens == want
        assert sum(s.proposed for s in got.steps) > 0
    assert sum(s.accepted for s in got.steps) > 0


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_model_draft_equals_plain_greedy(gamma):
    m = _target()
    want = _plain(m, PROMPT, 24)
    for draft_seed in (1, 2):  # the same weights (all accepted) and other weights (many rejections)
        d = _target(draft_seed)
        got = speculative_generate(m, ModelDrafter(d, 64), PROMPT, 24, gamma, SamplingParams())
        assert got.tokens == want
        assert (got.acceptance_rate == 1.0) == (draft_seed == 1)


@needs_torch
def test_greedy_int8_draft_equals_plain_greedy():
    from perfmodel.engine.quantised import int8_model

    w = random_weights(SPEC, 1, std=0.3)
    m = Transformer(SPEC, w, make_backend("numpy"))
    want = _plain(m, PROMPT, 20)
    got = speculative_generate(m, ModelDrafter(int8_model(SPEC, w), 64), PROMPT, 20, 3, SamplingParams())
    assert got.tokens == want
    assert got.acceptance_rate > 0.5


def _exact_joint(m, prompt, n, params):
    """P(first n generated tokens) of the target, by enumeration over a small vocabulary."""
    V = m.spec.vocab_size
    joint = np.zeros((V,) * n)

    def rec(seq, prob, idx):
        lg = m.forward(np.asarray([seq]), KVCache(m.be, m.spec, 1, len(seq)))[:, -1, :]
        p = filtered_probs(np.asarray(lg), params)[0]
        for t in range(V):
            if len(idx) + 1 == n:
                joint[tuple(idx + [t])] = prob * p[t]
            else:
                rec(seq + [t], prob * p[t], idx + [t])

    rec(list(prompt), 1.0, [])
    return joint


def _chi2_p(counts, probs):
    from scipy.stats import chisquare

    exp = probs.ravel() * counts.sum()
    obs = counts.ravel().astype(float)
    small_ = exp < 5  # cells too rare for the chi-square approximation are pooled into one
    obs = np.append(obs[~small_], obs[small_].sum())
    exp = np.append(exp[~small_], exp[small_].sum())
    return chisquare(obs, exp).pvalue


def test_sampling_preserves_the_target_distribution():
    """Chi-square over the joint of the first 3 tokens (the 2nd and 3rd drafted and verified in one step), and
    the same samples tested against the draft's distribution: the test has the power to tell them apart."""
    spec = small("smollm2-135m", vocab_size=6)
    tgt = Transformer(spec, random_weights(spec, 3, std=0.5), make_backend("numpy"))
    drf = Transformer(spec, random_weights(spec, 4, std=0.5), make_backend("numpy"))
    prompt = [1, 2, 3]
    params = SamplingParams(temperature=1.0, seed=11)
    n = 3
    counts = np.zeros((spec.vocab_size,) * n)
    acc = []
    for i in range(2500):
        g = speculative_generate(tgt, ModelDrafter(drf, 16), prompt, n, 2, SamplingParams(1.0, seed=1000 + i))
        counts[tuple(g.tokens)] += 1
        acc.append(g.acceptance_rate)
    p_target = _chi2_p(counts, _exact_joint(tgt, prompt, n, params))
    p_draft = _chi2_p(counts, _exact_joint(drf, prompt, n, params))
    assert p_target > 1e-3, p_target
    assert p_draft < 1e-6, p_draft
    assert 0.1 < np.mean(acc) < 0.95  # drafts were both accepted and rejected


def test_ngram_proposes_the_continuation_of_the_latest_match():
    d = NgramDrafter(3)
    ctx = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3]
    draft, _ = d.propose(ctx, 3, None, SamplingParams())
    assert draft == [5, 6, 7]  # "2 3" last seen before 5 6 7 (no 3-gram "7 2 3" earlier)
    assert d.propose([1, 2, 3], 3, None, SamplingParams())[0] == []


def _expected(gen, target_spec, draft_spec, tp, dp, flash_t, flash_d):
    exp = {}
    for f in gen.forwards:
        if f.model == "target":
            ops = (verify_ops(target_spec, f.new - 1, f.past, tp, flash_t, "eager") if f.phase == "verify" else
                   draft_ops(target_spec, f.new, f.past, tp, flash_t, "eager"))
        else:
            ops = draft_ops(draft_spec, f.new, f.past, dp, flash_d, "eager", rollback=f.rollback, sample=f.sampled)
        exp[(f.phase, f.step)] = ops
    return exp


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_speculative_counts_equal_cost_model_exactly(drafter):
    """Every verification (gamma+1 tokens against the cache, logits at each, the rollback) and every draft
    forward (1 or 2 new tokens) of a run, operator by operator, equal the cost model's FLOPs and bytes."""
    tt, td = Tracer(enabled=True, timed=False), Tracer(enabled=True, timed=False)
    m = _looping(tt)
    # the draft model: the target's first layer with its LM head (the layer-truncated draft)
    dspec, dw = truncate(SPEC, random_weights(SPEC, 5, std=0.1), 1)
    d = NgramDrafter(3) if drafter == "ngram" else ModelDrafter(Transformer(dspec, dw, m.be, tracer=td), 64)
    gen = speculative_generate(m, d, PROMPT, 24, 3, SamplingParams())
    p32 = Precision("fp32", "fp32", "fp32")
    exp = _expected(gen, SPEC, dspec, p32, p32, False, False)
    tgt = {k: v for k, v in exp.items() if k[0] in ("prefill", "verify")}
    mism = compare_forwards(tt.records, tgt)
    assert not mism, "\n".join(map(str, mism[:10]))
    if drafter == "model":
        drf = {k: v for k, v in exp.items() if k[0] not in ("prefill", "verify")}
        assert any(f.new == 2 for f in gen.forwards if f.model == "draft")  # a full acceptance happened
        mism = compare_forwards(td.records, drf)
        assert not mism, "\n".join(map(str, mism[:10]))
    assert sum(s.accepted for s in gen.steps) > 0 and any(s.accepted < s.proposed for s in gen.steps)


@needs_torch
def test_int8_draft_counts_equal_cost_model_exactly():
    """The int8 draft (torch, bf16, FlashAttention): int8 codes plus one bf16 scale per output channel."""
    from perfmodel.engine.quantised import int8_model

    tt, td = Tracer(enabled=True, timed=False), Tracer(enabled=True, timed=False)
    w = random_weights(SPEC, 1, std=0.3)
    m = Transformer(SPEC, w, make_backend("numpy"), tracer=tt)
    gen = speculative_generate(m, ModelDrafter(int8_model(SPEC, w, td), 64), PROMPT, 16, 3, SamplingParams())
    exp = _expected(gen, SPEC, SPEC, Precision("fp32", "fp32", "fp32"), Precision("int8_channel", "bf16", "bf16"),
                    False, True)
    drf = {k: v for k, v in exp.items() if k[0] not in ("prefill", "verify")}
    mism = compare_forwards(td.records, drf)
    assert not mism, "\n".join(map(str, mism[:10]))


def test_predicted_speedup_follows_the_formula():
    from perfmodel.validation.speculative import StepCosts, predict

    costs = StepCosts(decode_s=1.0, verify_s={k: 1.0 for k in range(9)}, draft_s=0.0, catchup_s=0.0)
    assert predict(1.0, [4] * 10, costs)["predicted_speedup"] == pytest.approx(5.0)
    assert predict(0.5, [0] * 3, costs)["predicted_speedup"] == pytest.approx(1.0)  # no proposals: plain steps
    slow = StepCosts(1.0, {k: 1.0 + 0.25 * k for k in range(9)}, 0.2, 0.1)
    r = predict(0.8, [3, 3], slow)
    tokens = (1 - 0.8 ** 4) / 0.2
    assert r["predicted_speedup"] == pytest.approx(tokens / (3 * 0.2 + 1.75 + 0.8 ** 3 * 0.1))


def _cli_json(args, capsys):
    import json

    from perfmodel.cli.app import main

    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("drafter", ["ngram", pytest.param("int8", marks=needs_torch)])
def test_generate_speculative_json(drafter, capsys):
    d = _cli_json(["generate", "--model", "gpt2", "--layers", "1", "--prompt", "1 2 3 4 1 2 3 4 1 2",
                   "--max-new-tokens", "8", "--speculative", drafter, "--gamma", "3", "--format", "json"], capsys)
    assert d["same_as_plain"] and d["generated_tokens"] == 8 and len(d["token_ids"]) == 8
    assert 0 <= d["acceptance_rate"] <= 1 and d["tokens_per_target_step"] >= 1 and d["measured_speedup"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--speculative", "eagle"], "--speculative"), (["--speculative", "ngram", "--gamma", "0"], "--gamma"),
    (["--speculative", "ngram", "--no-cache"], "--no-cache")])
def test_generate_speculative_bad_arguments(args, needle, capsys):
    from perfmodel.cli.app import main

    code = main(["generate", "--model", "gpt2", "--layers", "1", "--prompt", "1 2", *args])
    _, err = capsys.readouterr()
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_planning_takes_alpha_from_the_measured_table(tmp_path, capsys):
    from perfmodel.cli.app import main
    from perfmodel.validation.speculative import write_alpha_table

    rows = [{"prompt": "prose", "drafter": "ngram", "gamma": g, "acceptance_rate": a, "measured_speedup": 1.0}
            for g, a in ((2, 0.41), (4, 0.55))]
    path = write_alpha_table(rows, tmp_path / "alpha.json", "local-test")
    d = _cli_json(["speculative", "--alpha", "prose/ngram", "--gamma", "2,4", "--table", str(path),
                   "--format", "json"], capsys)
    assert [(r["alpha"], r["gamma"]) for r in d] == [(0.41, 2), (0.55, 4)]
    for args, needle in ((["--alpha", "prose/eagle"], "--alpha"), (["--alpha", "prose/ngram", "--gamma", "3"],
                                                                     "--gamma")):
        code = main(["speculative", "--table", str(path), *args])
        _, err = capsys.readouterr()
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_the_baseline_loop_is_plain_decoding():
    from perfmodel.engine.speculative import NoDrafter

    m = _target()
    g = speculative_generate(m, NoDrafter(), PROMPT, 12, 4, SamplingParams())
    assert g.tokens == _plain(m, PROMPT, 12) and g.tokens_per_step == 1.0 and len(g.steps) == 11


@needs_weights
@needs_torch
@pytest.mark.weights
@pytest.mark.slow
def test_real_weights_greedy_speculative_equals_plain(smollm2):
    """SmolLM2-135M: prompt lookup and the int8 draft reproduce plain greedy decoding; the int8 draft agrees."""
    from perfmodel.engine.quantised import int8_model

    spec, w, tok = smollm2
    m = Transformer(spec, w, make_backend("numpy"))
    ids = tok.encode("The for statement repeats. The for statement")
    want = _plain(m, ids, 12)
    for d in (NgramDrafter(3), ModelDrafter(int8_model(spec, w), len(ids) + 20)):
        got = speculative_generate(m, d, ids, 12, 4, SamplingParams())
        assert got.tokens == want
        if isinstance(d, ModelDrafter):
            assert got.acceptance_rate > 0.8
