"""Resolve --model for the engine: real SmolLM2 weights, a GGUF file, a safetensors folder, or random weights."""

from __future__ import annotations

from pathlib import Path

from perfmodel.engine.transformer import Weights
from perfmodel.errors import PerfmodelError
from perfmodel.specs.model import ModelSpec, load_model

REAL_WEIGHTS = ("smollm2-135m",)


def load_engine_model(name: str, layers: int | None = None, seed: int = 0):
    """(spec, weights, tokenizer or None). Library models other than SmolLM2-135M get random weights at their
    true shapes, with `layers` layers if given (to fit this machine)."""
    from perfmodel.engine.weights import load_gguf, load_safetensors, random_weights, smollm2_gguf_path

    p = Path(name)
    tokenizer = None
    if name.lower() in REAL_WEIGHTS or p.suffix == ".gguf":
        from perfmodel.engine.tokenizer import GGUFTokenizer

        path = smollm2_gguf_path() if name.lower() in REAL_WEIGHTS else p
        if not path.is_file():
            raise PerfmodelError(f"model: GGUF file {path} not found")
        spec, weights = load_gguf(path)
        spec = spec.replace(name=name.lower() if name.lower() in REAL_WEIGHTS else spec.name)
        tokenizer = GGUFTokenizer(path)
    elif p.is_dir() and list(p.glob("*.safetensors")):
        spec, weights = load_safetensors(p)
        check_engine_support(spec)
    else:
        spec = load_model(name)
        if layers:
            spec = spec.replace(num_layers=layers, first_dense_layers=min(spec.first_dense_layers, layers))
        check_engine_support(spec)
        need = spec.param_count() * 4  # fp32 master copy
        avail = _available_memory()
        if avail and need > 0.6 * avail:
            raise PerfmodelError(f"--layers: {spec.name} with {spec.num_layers} layers needs {need / 1e9:.1f} GB of "
                                 f"fp32 weights, more than this machine can hold ({avail / 1e9:.1f} GB available); "
                                 "pass fewer --layers")
        weights = random_weights(spec, seed)
        return spec, weights, None
    if layers:
        spec, weights = truncate(spec, weights, layers)
    return spec, weights, tokenizer


def check_engine_support(spec: ModelSpec) -> None:
    if spec.is_mla:
        raise PerfmodelError(f"model {spec.name}: the reference engine runs llama, mixtral and gpt2 families; "
                             "MLA (deepseek) is modelled analytically only")
    if spec.architecture != "decoder":
        raise PerfmodelError(f"model {spec.name}: the reference engine runs decoder-only models; "
                             f"{spec.architecture} models are modelled analytically only")
    missing = unsupported_features(spec)
    if missing:
        raise PerfmodelError(f"model {spec.name}: the reference engine does not implement {', '.join(missing)}; "
                             "this model is modelled analytically only")


def unsupported_features(spec: ModelSpec) -> list[str]:
    """Structure of today's families that the engine's transformer does not run (the cost model does)."""
    checks = [
        (bool(spec.attention_pattern), "mixed attention layer types"),
        (bool(spec.qk_norm), "q/k norm"),
        (spec.attention_sinks, "attention sinks"),
        (spec.attn_logit_softcap is not None or spec.final_logit_softcap is not None, "logit soft-capping"),
        (spec.sandwich_norm, "post-attention/post-MLP norms"),
        (spec.o_bias or spec.moe_bias, "output/expert biases"),
        (spec.is_moe and (spec.moe_layer_interval != 1 or spec.num_shared_experts > 0),
         "interleaved MoE or shared experts"),
        (spec.activation not in ("silu", "gelu"), f"the {spec.activation} activation"),
        (bool(spec.expert_weight_dtype), f"{spec.expert_weight_dtype} expert weights"),
    ]
    return [what for bad, what in checks if bad]


def _available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def truncate(spec: ModelSpec, weights: Weights, layers: int) -> tuple[ModelSpec, Weights]:
    if not 1 <= layers <= spec.num_layers:
        raise PerfmodelError(f"--layers: {layers} is not valid; allowed: 1..{spec.num_layers}")
    return (spec.replace(num_layers=layers),
            Weights(weights.tok_emb, weights.layers[:layers], weights.final_norm, weights.final_norm_b,
                    weights.lm_head, weights.pos_emb))
