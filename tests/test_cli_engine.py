import json

import pytest

from conftest import needs_weights
from perfmodel.cli.app import main


@needs_weights
@pytest.mark.weights
def test_generate_trace_shows_cache_growing(capsys):
    code = main(["generate", "--max-new-tokens", "4", "--trace"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith(("prefill", "decode"))]
    assert lines[0].startswith("prefill") and "5 tokens" in lines[0] and "230,400 B ✓" in lines[0]
    assert "cache     6 tokens" in lines[1] and "cache     8 tokens" in lines[3]
    assert "Paris" in out


def test_generate_random_weights_json(capsys):
    code = main(["generate", "--model", "gpt2", "--layers", "1", "--prompt", "1 2 3", "--max-new-tokens", "3",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["generated_tokens"] == 3 and [s["cache_tokens"] for s in d["steps"]] == [3, 4, 5]


@pytest.mark.parametrize("args,needle", [
    (["generate", "--backend", "jax"], "--backend"),
    (["generate", "--model", "gpt2", "--layers", "1", "--prompt", "hello"], "--prompt"),
    (["generate", "--model", "gpt2", "--layers", "1", "--prompt", "1", "--top-p", "2"], "--top-p"),
    (["generate", "--model", "gpt2", "--layers", "1", "--prompt", "1", "--dtype", "bf16"], "--dtype"),
    (["generate", "--model", "deepseek-v3", "--layers", "1", "--prompt", "1"], "MLA"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_generate_bad_arguments(args, needle, capsys):
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
