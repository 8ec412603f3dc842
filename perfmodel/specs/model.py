"""ModelSpec: the shape of a transformer, from YAML, a Hugging Face config.json, or the built-in library."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from perfmodel.errors import PerfmodelError, bad_value, short, show
from perfmodel.schemas import count, dataclass_schema, is_dir, is_file, number, read_text, read_yaml_mapping, validate

FAMILIES = ("llama", "mixtral", "gpt2", "deepseek")
LAYER_TYPES = ("global", "sliding", "chunked")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position: int = 4096
    head_dim: int = 0  # 0: hidden_size // num_heads
    activation: str = ""  # silu (llama, mixtral, deepseek) or gelu (gpt2, gemma); "" picks by family
    tied_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # mixture of experts
    num_experts: int = 0
    experts_per_token: int = 0
    num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_dense_layers: int = 0
    # multi-head latent attention (DeepSeek-V2/V3)
    attention: str = "mha"  # mha covers GQA and MQA through num_kv_heads; mla caches a latent
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # encoder-only (BERT) and encoder-decoder (T5) models; decoder-only is the default
    architecture: str = "decoder"  # decoder | encoder | encoder-decoder
    num_encoder_layers: int = 0  # encoder-decoder: layers of the encoder stack (num_layers: the decoder's)
    gated: bool | None = None  # gated (SwiGLU/GeGLU) MLP; None: by family
    position_embedding: str = ""  # rope | learned | relative; "" by family
    # per-layer attention structure (Gemma 2/3, gpt-oss, Llama 4). Layer i has type attention_pattern[i % len]:
    # global (every earlier key), sliding (the last sliding_window keys), chunked (keys of its own
    # attention_chunk_size-token chunk). () = every layer sliding when sliding_window is set, else global.
    attention_pattern: tuple = ()
    attention_chunk_size: int | None = None
    global_nope: bool = False  # global layers apply no rotary embedding (Llama 4's NoPE layers)
    qk_norm: str = ""  # "" | rmsnorm (per head, weighted: Qwen3, Gemma 3) | l2 (unweighted, Llama 4's RoPE layers)
    attention_sinks: bool = False  # a learned per-head logit in the softmax denominator (gpt-oss)
    attn_logit_softcap: float | None = None  # scores become cap*tanh(score/cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the final logits
    sandwich_norm: bool = False  # a norm after attention and after the MLP too (Gemma 2/3: 4 norms per layer)
    o_bias: bool = False  # a bias on the output projection (gpt-oss attention_bias)
    moe_bias: bool = False  # biases on the router and the experts (gpt-oss)
    moe_layer_interval: int = 1  # every k-th layer after first_dense_layers is MoE (Llama 4 Maverick: 2)
    expert_weight_dtype: str = ""  # the published checkpoint's expert format (gpt-oss: mxfp4); "": the weights'
    vision_params: int = 0  # vision encoder + projector in the checkpoint: held in memory, not run for text
    published_params: float | None = None
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise bad_value(f"model {self.name}: family", self.family, "|".join(FAMILIES))
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise bad_value(f"model {self.name}: {f}", v, "a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise bad_value(f"model {self.name}: num_kv_heads", self.num_kv_heads,
                            f"a divisor of num_heads={self.num_heads}")
        if self.attention not in ("mha", "mla"):
            raise bad_value(f"model {self.name}: attention", self.attention, "mha|mla")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not self.activation:
            object.__setattr__(self, "activation", "gelu" if self.family == "gpt2" else "silu")
        if self.architecture not in ("decoder", "encoder", "encoder-decoder"):
            raise bad_value(f"model {self.name}: architecture", self.architecture, "decoder|encoder|encoder-decoder")
        if self.num_experts and not self.moe_intermediate_size:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        self._check_layer_structure()

    def _check_layer_structure(self) -> None:
        where = f"model {self.name}"
        pattern = self.attention_pattern
        if isinstance(pattern, str):
            pattern = tuple(x.strip() for x in pattern.split(",") if x.strip())
        object.__setattr__(self, "attention_pattern", tuple(pattern or ()))
        for t in self.attention_pattern:
            if t not in LAYER_TYPES:
                raise bad_value(f"{where}: attention_pattern", t, "|".join(LAYER_TYPES))
        if "sliding" in self.attention_pattern and not self.sliding_window:
            raise bad_value(f"{where}: sliding_window", self.sliding_window, "a positive integer (sliding layers)")
        if "chunked" in self.attention_pattern and not self.attention_chunk_size:
            raise bad_value(f"{where}: attention_chunk_size", self.attention_chunk_size,
                            "a positive integer (chunked layers)")
        if self.qk_norm not in ("", "rmsnorm", "l2"):
            raise bad_value(f"{where}: qk_norm", self.qk_norm, "rmsnorm|l2 or empty")
        if not isinstance(self.moe_layer_interval, int) or self.moe_layer_interval < 1:
            raise bad_value(f"{where}: moe_layer_interval", self.moe_layer_interval, "a positive integer")
        if self.expert_weight_dtype:
            from perfmodel.dtypes import get_dtype

            get_dtype(self.expert_weight_dtype, f"{where}: expert_weight_dtype")
        if not isinstance(self.vision_params, int) or self.vision_params < 0:
            raise bad_value(f"{where}: vision_params", self.vision_params, "a non-negative integer")


    # --- structure -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def gated_mlp(self) -> bool:
        return self.family != "gpt2" if self.gated is None else self.gated

    @property
    def norm(self) -> str:
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    @property
    def positions(self) -> str:
        return self.position_embedding or ("learned" if self.family == "gpt2" else "rope")

    @property
    def linear_bias(self) -> bool:
        """GPT-2 has a bias on every linear layer; the others at most on q/k/v (qkv_bias)."""
        return self.family == "gpt2"

    @property
    def attention_kind(self) -> str:
        if self.is_mla:
            return "MLA"
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def moe_layers(self) -> int:
        """Layers i >= first_dense_layers with (i - first_dense_layers + 1) % moe_layer_interval == 0 (the
        rule of DeepSeek's first_k_dense_replace, Llama 4's interleave_moe_layer_step, Qwen's decoder_sparse_step)."""
        if not self.is_moe:
            return 0
        return (self.num_layers - self.first_dense_layers) // self.moe_layer_interval

    # --- per-layer attention types ----------------------------------------------------------
    def layer_types(self) -> list[str]:
        """The attention type of every layer, first to last."""
        if self.attention_pattern:
            pat = self.attention_pattern
            return [pat[i % len(pat)] for i in range(self.num_layers)]
        return ["sliding" if self.sliding_window else "global"] * self.num_layers

    def layer_type_counts(self) -> dict[str, int]:
        """Layers of each attention type present, in LAYER_TYPES order."""
        types = self.layer_types()
        return {t: types.count(t) for t in LAYER_TYPES if t in types}

    def attention_span(self, layer_type: str) -> tuple[int | None, int | None]:
        """(window, chunk) of a layer type: the keys a query of that type may see."""
        if layer_type == "sliding":
            return self.sliding_window, None
        if layer_type == "chunked":
            return None, self.attention_chunk_size
        return None, None

    def cache_cap(self, layer_type: str) -> int | None:
        """Most tokens a layer of this type keeps cached (None: all of them). A sliding layer keeps its window;
        a chunked layer keeps at most one chunk (the capacity a server reserves for it)."""
        window, chunk = self.attention_span(layer_type)
        return window or chunk

    @property
    def rope_layers(self) -> int:
        """Layers that rotate q and k (all of them for RoPE models, but not Llama 4's NoPE global layers)."""
        if self.positions != "rope":
            return 0
        if self.global_nope:
            return self.num_layers - self.layer_type_counts().get("global", 0)
        return self.num_layers

    @property
    def qk_norm_layers(self) -> int:
        """Layers with a q/k norm: all, except that Llama 4's unweighted L2 norm runs on its RoPE layers only."""
        if not self.qk_norm:
            return 0
        return self.rope_layers if self.qk_norm == "l2" and self.global_nope else self.num_layers

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    # --- KV cache ---------------------------------------------------------------------------
    @property
    def kv_elements_per_token_per_layer(self) -> int:
        """Cached elements for one token in one layer: 2*kv_heads*head_dim, or the MLA latent."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_elements_per_token(self) -> int:
        return self.num_layers * self.kv_elements_per_token_per_layer

    # --- parameters -------------------------------------------------------------------------
    def attention_params(self) -> int:
        h, nq = self.hidden_size, self.num_heads
        if self.is_mla:
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nq * self.qk_head_dim
                 if self.q_lora_rank else h * nq * self.qk_head_dim)
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * nq * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + nq * self.v_head_dim * h
        q_out, kv_out = nq * self.head_dim, self.num_kv_heads * self.head_dim
        p = h * q_out + 2 * h * kv_out + q_out * h
        if self.qkv_bias or self.linear_bias:
            p += q_out + 2 * kv_out
        if self.linear_bias or self.o_bias:
            p += h
        if self.attention_sinks:
            p += nq
        return p

    def qk_norm_params(self) -> int:
        """Weights of one layer's q and k norms (one head_dim vector each; none for an L2 norm)."""
        return 2 * self.head_dim if self.qk_norm == "rmsnorm" else 0

    def mlp_params(self, ffn: int | None = None) -> int:
        h, f = self.hidden_size, self.intermediate_size if ffn is None else ffn
        if self.gated_mlp:
            return 3 * h * f
        return 2 * h * f + (f + h if self.linear_bias else 0)

    def moe_params(self) -> tuple[int, int]:
        """(total, active per token) parameters of one MoE block, router included."""
        h, e = self.hidden_size, self.num_experts
        expert = self.mlp_params(self.moe_intermediate_size)
        shared = self.num_shared_experts * expert
        router = h * e
        if self.moe_bias:  # router bias; each expert's gate/up and down biases (gpt-oss)
            router += e
            expert += (2 if self.gated_mlp else 1) * self.moe_intermediate_size + h
        total = router + e * expert + shared
        active = router + self.experts_per_token * expert + shared
        return total, active

    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    @property
    def norms_per_layer(self) -> int:
        """Hidden-size norms in one layer: before attention and MLP, and after them too in sandwich models."""
        return 4 if self.sandwich_norm else 2

    def embedding_params(self) -> int:
        p = self.vocab_size * self.hidden_size
        if self.positions == "learned":
            p += self.max_position * self.hidden_size
        return p

    @property
    def is_decoder_only(self) -> bool:
        return self.architecture == "decoder"

    def lm_head_params(self) -> int:
        if self.tied_embeddings or self.architecture == "encoder":
            return 0
        return self.vocab_size * self.hidden_size

    def param_count(self, active: bool = False) -> int:
        attn = self.attention_params()
        extra_norms = 0
        if self.is_mla:
            extra_norms = 0  # q_a/kv_a norms are already in attention_params
        per_layer_common = attn + self.norms_per_layer * self.norm_params() + extra_norms
        dense = self.dense_layers * (per_layer_common + self.mlp_params())
        if self.architecture == "encoder-decoder":  # encoder stack + a cross-attention block per decoder layer
            dense += self.num_encoder_layers * (per_layer_common + self.mlp_params())
            dense += self.num_layers * (attn + self.norm_params())
        moe_total, moe_active = self.moe_params() if self.is_moe else (0, 0)
        moe = self.moe_layers * (per_layer_common + (moe_active if active else moe_total))
        qk_norms = self.qk_norm_layers * self.qk_norm_params()
        vision = 0 if active else self.vision_params  # a text token never runs the vision tower
        return (dense + moe + qk_norms + self.embedding_params() + self.lm_head_params() + self.norm_params()
                + vision)

    def expert_matmul_params(self) -> int:
        """Matmul weights of all routed experts (the part a checkpoint may store in expert_weight_dtype)."""
        mult = 3 if self.gated_mlp else 2
        return self.moe_layers * self.num_experts * mult * self.hidden_size * self.moe_intermediate_size

    def matmul_params(self, active: bool = True) -> int:
        """Parameters that take part in matmuls for one token (no norms, biases, embeddings; LM head in)."""
        h, nq = self.hidden_size, self.num_heads
        if self.is_mla:
            q = (h * self.q_lora_rank + self.q_lora_rank * nq * self.qk_head_dim
                 if self.q_lora_rank else h * nq * self.qk_head_dim)
            attn = (q + h * (self.kv_lora_rank + self.qk_rope_head_dim)
                    + self.kv_lora_rank * nq * (self.qk_nope_head_dim + self.v_head_dim) + nq * self.v_head_dim * h)
        else:
            attn = 2 * h * nq * self.head_dim + 2 * h * self.num_kv_heads * self.head_dim
        mlp_mult = 3 if self.gated_mlp else 2
        dense = self.dense_layers * (attn + mlp_mult * h * self.intermediate_size)
        experts = self.experts_per_token if active else self.num_experts
        moe = self.moe_layers * (attn + h * self.num_experts + (experts + self.num_shared_experts)
                                 * mlp_mult * h * self.moe_intermediate_size)
        if self.architecture == "encoder-decoder":
            dense += self.num_encoder_layers * (attn + mlp_mult * h * self.intermediate_size) + self.num_layers * attn
        return dense + moe + self.vocab_size * h

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["attention_pattern"] = list(self.attention_pattern)
        return d


# --- the schema -------------------------------------------------------------------------------------------
# Derived from the ModelSpec fields: a new field is validated by its annotation (int: an integer in [0, 2**31],
# float: a finite number >= 0, str, bool, X | None) with no change here; add a line to MODEL_RULES only when
# that default range is wrong for it. The bounds keep every count far from int64 overflow and every engine
# array sized from a real shape (published models: hidden <= 25k, layers <= 160, vocab <= 262k, context 10M).
MODEL_RULES = {
    "hidden_size": count(1, 2**17), "num_layers": count(1, 2**11), "num_heads": count(1, 2**12),
    "num_kv_heads": count(1, 2**12), "intermediate_size": count(1, 2**20), "vocab_size": count(1, 2**23),
    "max_position": count(1, 2**27), "head_dim": count(0, 2**12), "sliding_window": count(1, 2**27) | None,
    "rope_theta": number(gt=0), "norm_eps": number(gt=0, lt=1),
    "num_experts": count(0, 2**14), "experts_per_token": count(0, 2**14), "num_shared_experts": count(0, 2**14),
    "moe_intermediate_size": count(0, 2**20), "first_dense_layers": count(0, 2**11),
    "q_lora_rank": count(1, 2**17) | None, "kv_lora_rank": count(0, 2**17), "qk_nope_head_dim": count(0, 2**12),
    "qk_rope_head_dim": count(0, 2**12), "v_head_dim": count(0, 2**12), "num_encoder_layers": count(0, 2**11),
    "published_params": number(gt=0) | None,
    "attention_chunk_size": count(1, 2**27) | None, "moe_layer_interval": count(1, 2**11),
    "attn_logit_softcap": number(gt=0) | None, "final_logit_softcap": number(gt=0) | None,
    "vision_params": count(0, 2**40),
}
ModelSchema = dataclass_schema(ModelSpec, MODEL_RULES, name="ModelSchema")
_FIELDS = set(ModelSchema.model_fields)
_REQUIRED = ("family", "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")


def _cross_checks(v: dict) -> tuple[str, object, str] | None:
    """Constraints between fields, as (field, value, what is allowed) for the first one broken."""
    if v["num_kv_heads"] > v["num_heads"]:
        return "num_kv_heads", v["num_kv_heads"], f"must be <= num_heads ({v['num_heads']})"
    if not v["head_dim"] and v["hidden_size"] < v["num_heads"]:
        return "hidden_size", v["hidden_size"], f"must be >= num_heads ({v['num_heads']}) when head_dim is not given"
    if v["experts_per_token"] > v["num_experts"]:
        return "experts_per_token", v["experts_per_token"], f"must be <= num_experts ({v['num_experts']})"
    if v["num_experts"] and not v["experts_per_token"]:
        return "experts_per_token", 0, "must be >= 1 when num_experts is set"
    if v["first_dense_layers"] > v["num_layers"]:
        return "first_dense_layers", v["first_dense_layers"], f"must be <= num_layers ({v['num_layers']})"
    if v["attention"] == "mla":
        for f in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if v[f] < 1:
                return f, v[f], "must be an integer >= 1 for MLA attention"
    if v["architecture"] == "encoder-decoder" and v["num_encoder_layers"] < 1:
        return "num_encoder_layers", v["num_encoder_layers"], "must be an integer >= 1 for an encoder-decoder model"
    return None


def model_from_fields(d: dict, where: str, rename: dict[str, str] | None = None) -> ModelSpec:
    """Validate ModelSpec fields (a parsed YAML, or a mapped config.json) and build the spec. rename maps a
    ModelSpec field to the key the user wrote, so errors name their file's key."""
    v = validate(ModelSchema, d, where, rename=rename).model_dump()
    broken = _cross_checks(v)
    if broken:
        f, val, allowed = broken
        raise PerfmodelError(f"{where}: {(rename or {}).get(f, f)}: {allowed}, got {show(val)}")
    return ModelSpec(**v)


def model_from_dict(name: str, d: dict, where: str | None = None) -> ModelSpec:
    where = where or f"model {name}"
    if not isinstance(d, dict):
        raise PerfmodelError(f"{where}: expected a mapping of ModelSpec fields, got {type(d).__name__}")
    unknown = sorted(set(d) - _FIELDS, key=str)
    if unknown:
        raise PerfmodelError(f"{where}: {short(unknown[0])}: unknown field; allowed: {', '.join(sorted(_FIELDS))}")
    d = {**d, "name": d.get("name", name)}
    missing = [f for f in _REQUIRED if f not in d]
    if missing:
        raise PerfmodelError(f"{where}: {missing[0]}: required field missing")
    d.setdefault("num_kv_heads", d["num_heads"])
    return model_from_fields(d, where)


def _int_or_none(x):
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def model_from_hf_config(cfg: dict, name: str = "", where: str = "config.json") -> ModelSpec:
    """Map a Hugging Face config.json (HF_MODEL_TYPES) to a ModelSpec. Every value goes through the model schema;
    errors name the config.json key."""
    if not isinstance(cfg, dict):
        raise PerfmodelError(f"{where}: expected a JSON object of config fields, got {type(cfg).__name__}")
    mt = cfg.get("model_type", "llama")
    if not isinstance(mt, str):
        raise PerfmodelError(f"{where}: model_type: must be a string, got {show(mt)}")
    mt = _TEXT_MODEL_TYPES.get(mt, mt)
    if isinstance(cfg.get("text_config"), dict):  # multimodal checkpoints (Llama 4, Gemma 3): the language model
        cfg = {**cfg, **cfg["text_config"]}
    name = name or str(cfg.get("_name_or_path") or mt)
    kw: dict = {"name": name, "source": "config.json"}
    rename: dict[str, str] = {}

    def take(field: str, key: str, default=KeyError):
        """kw[field] = cfg[key] (or default), remembering the key for error messages."""
        if key not in cfg and default is KeyError:
            raise PerfmodelError(f"{where}: {key}: required field missing (model_type {mt!r})")
        kw[field] = cfg.get(key, default) if default is not KeyError else cfg[key]
        rename[field] = key
        return kw[field]

    if mt == "gpt2":
        h = take("hidden_size", "n_embd")
        take("num_layers", "n_layer")
        take("num_heads", "n_head")
        take("num_kv_heads", "n_head")
        take("intermediate_size", "n_inner", None)
        if kw["intermediate_size"] is None and _int_or_none(h) is not None:
            kw["intermediate_size"] = 4 * h
        take("vocab_size", "vocab_size")
        take("max_position", "n_positions", 1024)
        take("norm_eps", "layer_norm_epsilon", 1e-5)
        kw.update(family="gpt2", tied_embeddings=True)
    elif mt == "bert":
        for f, k in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                     ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_attention_heads"),
                     ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size")):
            take(f, k)
        take("max_position", "max_position_embeddings", 512)
        kw.update(family="gpt2", architecture="encoder", tied_embeddings=True)
    elif mt == "t5":
        take("hidden_size", "d_model")
        take("num_encoder_layers", "num_layers")
        take("num_layers", "num_decoder_layers", None)
        if kw["num_layers"] is None:
            take("num_layers", "num_layers")
        for f, k in (("num_heads", "num_heads"), ("num_kv_heads", "num_heads"), ("head_dim", "d_kv"),
                     ("intermediate_size", "d_ff"), ("vocab_size", "vocab_size")):
            take(f, k)
        take("tied_embeddings", "tie_word_embeddings", True)
        kw.update(family="llama", architecture="encoder-decoder", position_embedding="relative", max_position=512,
                  gated=str(cfg.get("feed_forward_proj", "relu")).startswith("gated"))
    else:
        if "hidden_size" not in cfg:
            raise PerfmodelError(f"{where}: model_type {mt!r} lacks hidden_size; supported: {', '.join(HF_MODEL_TYPES)}")
        moe_types = ("mixtral", "qwen3_moe", "llama4", "gpt_oss")
        family = {"deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}.get(mt, "mixtral" if mt in moe_types else "llama")
        for f, k in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                     ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
                     ("vocab_size", "vocab_size")):
            take(f, k)
        take("num_kv_heads", "num_key_value_heads", None)
        if kw["num_kv_heads"] is None:
            take("num_kv_heads", "num_attention_heads")
        take("head_dim", "head_dim", None)
        kw["head_dim"] = kw["head_dim"] or 0
        take("max_position", "max_position_embeddings", 4096)
        take("tied_embeddings", "tie_word_embeddings", mt.startswith("gemma"))  # Gemma's configs default to tied
        take("rope_theta", "rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        take("norm_eps", "rms_norm_eps", 1e-5)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        kw.update(family=family, sliding_window=window, activation="gelu" if mt.startswith("gemma") else "silu",
                  qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)))
        rename["sliding_window"] = "sliding_window"
        if mt == "mixtral":
            take("num_experts", "num_local_experts")
            take("experts_per_token", "num_experts_per_tok")
        if family == "deepseek":
            kw["attention"] = "mla"
            take("q_lora_rank", "q_lora_rank", None)
            for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                take(f, f)
            for f, k in (("num_experts", "n_routed_experts"), ("experts_per_token", "num_experts_per_tok"),
                         ("num_shared_experts", "n_shared_experts"), ("moe_intermediate_size", "moe_intermediate_size"),
                         ("first_dense_layers", "first_k_dense_replace")):
                take(f, k, None)
                kw[f] = kw[f] or 0
        _map_recent_families(mt, cfg, kw, take, where)
    for f in ("tied_embeddings",):  # JSON booleans only: "false" must not read as True
        if not isinstance(kw.get(f, False), bool):
            raise PerfmodelError(f"{where}: {rename.get(f, f)}: must be true or false, got {show(kw[f])}")
    return model_from_fields(kw, where, rename)


HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "gemma3_text",
                  "mixtral", "llama4", "gpt_oss", "phi3", "gpt2", "bert", "t5", "deepseek_v2", "deepseek_v3")
_TEXT_MODEL_TYPES = {"llama4_text": "llama4", "gemma3_text": "gemma3"}
_HF_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "sliding", "chunked_attention": "chunked"}


def _map_recent_families(mt: str, cfg: dict, kw: dict, take, where: str) -> None:
    """The structure of Qwen3, Gemma 2/3, Llama 4 and gpt-oss configs (q/k norm, layer types, soft-caps, MoE
    interleave, sinks, biases, checkpoint formats), added to the llama-style fields already in kw."""
    layers = kw["num_layers"]
    if mt in ("qwen3", "qwen3_moe"):
        kw["qk_norm"] = "rmsnorm"
    if mt == "qwen3_moe":
        take("num_experts", "num_experts")
        take("experts_per_token", "num_experts_per_tok")
        take("moe_intermediate_size", "moe_intermediate_size")
        take("moe_layer_interval", "decoder_sparse_step", 1)
        kw["first_dense_layers"] = _leading_dense_layers(cfg.get("mlp_only_layers") or [], where)
    if mt == "gemma2":
        kw.update(attention_pattern=("sliding", "global"), sandwich_norm=True)
        take("attn_logit_softcap", "attn_logit_softcapping", None)
        take("final_logit_softcap", "final_logit_softcapping", None)
    if mt == "gemma3":
        n = cfg.get("sliding_window_pattern") or 6
        if not isinstance(n, int) or n < 1:
            raise PerfmodelError(f"{where}: sliding_window_pattern: must be an integer >= 1, got {show(n)}")
        kw.update(attention_pattern=("sliding",) * (n - 1) + ("global",), sandwich_norm=True, qk_norm="rmsnorm")
        take("attn_logit_softcap", "attn_logit_softcapping", None)
        take("final_logit_softcap", "final_logit_softcapping", None)
    if mt == "llama4":
        step = take("moe_layer_interval", "interleave_moe_layer_step", 1)
        moe_at = cfg.get("moe_layers")
        if moe_at is not None and isinstance(step, int) and step >= 1 \
                and list(moe_at) != list(range(step - 1, layers, step)):
            raise PerfmodelError(f"{where}: moe_layers: only every interleave_moe_layer_step-th layer is expressed, "
                                 f"got {show(moe_at)}")
        every = cfg.get("no_rope_layer_interval") or 4
        rope = cfg.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(layers)]
        chunk = take("attention_chunk_size", "attention_chunk_size", None)
        kw["intermediate_size"] = cfg.get("intermediate_size_mlp") or kw["intermediate_size"]
        take("moe_intermediate_size", "intermediate_size")
        take("num_experts", "num_local_experts")
        take("experts_per_token", "num_experts_per_tok")
        kw.update(num_shared_experts=1, global_nope=True, qk_norm="l2" if cfg.get("use_qk_norm", True) else "",
                  attention_pattern=_period([("chunked" if chunk else "global") if r else "global" for r in rope]))
    if mt == "gpt_oss":
        take("num_experts", "num_local_experts")
        take("experts_per_token", "num_experts_per_tok")
        bias = bool(cfg.get("attention_bias", True))
        quant = (cfg.get("quantization_config") or {}).get("quant_method", "")
        kw.update(attention_sinks=True, qkv_bias=bias, o_bias=bias, moe_bias=True, activation="swiglu_oai",
                  expert_weight_dtype="mxfp4" if quant == "mxfp4" else "", attention_pattern=("sliding", "global"))
    if isinstance(cfg.get("layer_types"), list) and cfg["layer_types"]:  # the explicit list wins over each rule
        kw["attention_pattern"] = _period([_HF_LAYER_TYPES.get(t, t) for t in cfg["layer_types"]])
    if kw.get("attention_pattern") == ("global",):
        kw.update(attention_pattern=(), sliding_window=None)
    elif kw.get("attention_pattern") == ("sliding",):
        kw["attention_pattern"] = ()


def _period(types: list) -> tuple:
    """The shortest repeating unit of a per-layer list (the whole list if it does not repeat)."""
    n = len(types)
    for p in range(1, n + 1):
        if all(types[i] == types[i % p] for i in range(n)):
            return tuple(types[:p])
    return tuple(types)


def _leading_dense_layers(dense: list, where: str) -> int:
    """mlp_only_layers as a count of leading dense layers; other placements are not expressed."""
    if sorted(dense) != list(range(len(dense))):
        raise PerfmodelError(f"{where}: mlp_only_layers: only leading dense layers are expressed, got {show(dense)}")
    return len(dense)


@lru_cache(maxsize=1)
def _library() -> dict:
    text = resources.files("perfmodel.models").joinpath("library.yaml").read_text()
    return yaml.safe_load(text)


def list_models() -> list[ModelSpec]:
    return [model_from_dict(n, d) for n, d in _library().items()]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dirs() -> list[Path]:
    """Where a Hugging Face hub cache may be, in huggingface_hub's order: HF_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return [Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()]
    if env.get("HF_HOME"):
        return [Path(env["HF_HOME"]).expanduser() / "hub"]
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return [base / "huggingface" / "hub"]


def hf_cached_config(repo_id: str) -> Path | None:
    """config.json of a repo in the local hub cache: the snapshot refs/main points at, else the newest one."""
    for cache in hf_cache_dirs():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.is_file():
            p = repo / "snapshots" / ref.read_text().strip() / "config.json"
            if p.is_file():
                return p
        found = sorted(repo.glob("snapshots/*/config.json"), key=lambda q: q.stat().st_mtime)
        if found:
            return found[-1]
    return None


def load_model(name_or_path: str | ModelSpec) -> ModelSpec:
    """A library name (case-insensitive), a YAML file, a config.json, a folder holding config.json, or a Hugging
    Face repo id (org/name) whose config.json is in the local hub cache (nothing is downloaded)."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    lib = _library()
    key = str(name_or_path).lower()
    if key in lib:
        return model_from_dict(key, lib[key])
    p = Path(name_or_path)
    if is_dir(p) and is_file(p / "config.json"):
        p = p / "config.json"
    repo_id = None
    if not is_file(p) and _REPO_ID.match(str(name_or_path)):
        repo_id = str(name_or_path)
        cached = hf_cached_config(repo_id)
        if cached is None:
            where = ", ".join(str(d) for d in hf_cache_dirs())
            raise PerfmodelError(f"model: {repo_id} has no config.json in the local Hugging Face cache ({where}); "
                                 f"fetch it first with `huggingface-cli download {repo_id} config.json` (or set "
                                 "HF_HOME / HF_HUB_CACHE to a cache that has it); perfmodel downloads nothing")
        p = cached
    if is_file(p):
        where = short(p)
        if p.suffix == ".json":
            try:
                cfg = json.loads(read_text(p, where))
            except json.JSONDecodeError as e:
                raise PerfmodelError(f"{where}: malformed JSON: {e.msg} at line {e.lineno}") from None
            except RecursionError:
                raise PerfmodelError(f"{where}: malformed JSON: nested too deeply") from None
            name = repo_id or (p.parent.name if p.name == "config.json" else p.stem)
            return model_from_hf_config(cfg, name=name, where=where)
        return model_from_dict(p.stem, read_yaml_mapping(p), where=where)
    raise bad_value("model", str(name_or_path),
                    "a file path, a Hugging Face repo id in the local cache, or one of " + ", ".join(lib))
