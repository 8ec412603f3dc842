"""ModelSpec: the shape of a transformer, from YAML, a Hugging Face config.json, or the built-in library."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from perfmodel.errors import PerfmodelError, bad_value, short, show
from perfmodel.schemas import count, dataclass_schema, is_dir, is_file, number, read_text, read_yaml_mapping, validate

FAMILIES = ("llama", "mixtral", "gpt2", "deepseek")


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
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

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
        if self.linear_bias:
            p += h
        return p

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
        total = h * e + e * expert + shared
        active = h * e + self.experts_per_token * expert + shared
        return total, active

    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

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
        per_layer_common = attn + 2 * self.norm_params() + extra_norms
        dense = self.dense_layers * (per_layer_common + self.mlp_params())
        if self.architecture == "encoder-decoder":  # encoder stack + a cross-attention block per decoder layer
            dense += self.num_encoder_layers * (per_layer_common + self.mlp_params())
            dense += self.num_layers * (attn + self.norm_params())
        moe_total, moe_active = self.moe_params() if self.is_moe else (0, 0)
        moe = self.moe_layers * (per_layer_common + (moe_active if active else moe_total))
        return dense + moe + self.embedding_params() + self.lm_head_params() + self.norm_params()

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
    """Map a Hugging Face config.json (llama, mistral, qwen2, gemma, mixtral, gpt2, bert, t5, deepseek_v2/v3) to
    a ModelSpec. Every value goes through the model schema; errors name the config.json key."""
    if not isinstance(cfg, dict):
        raise PerfmodelError(f"{where}: expected a JSON object of config fields, got {type(cfg).__name__}")
    mt = cfg.get("model_type", "llama")
    if not isinstance(mt, str):
        raise PerfmodelError(f"{where}: model_type: must be a string, got {show(mt)}")
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
            raise PerfmodelError(f"{where}: model_type {mt!r} lacks hidden_size; supported: llama, mistral, qwen2, "
                                 "gemma, mixtral, gpt2, bert, t5, deepseek_v2, deepseek_v3")
        family = {"mixtral": "mixtral", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}.get(mt, "llama")
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
        take("tied_embeddings", "tie_word_embeddings", False)
        take("rope_theta", "rope_theta", 10000.0)
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
    for f in ("tied_embeddings",):  # JSON booleans only: "false" must not read as True
        if not isinstance(kw.get(f, False), bool):
            raise PerfmodelError(f"{where}: {rename.get(f, f)}: must be true or false, got {show(kw[f])}")
    return model_from_fields(kw, where, rename)


@lru_cache(maxsize=1)
def _library() -> dict:
    text = resources.files("perfmodel.models").joinpath("library.yaml").read_text()
    return yaml.safe_load(text)


def list_models() -> list[ModelSpec]:
    return [model_from_dict(n, d) for n, d in _library().items()]


def load_model(name_or_path: str | ModelSpec) -> ModelSpec:
    """A library name (case-insensitive), a YAML file, a config.json, or a folder holding config.json."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    lib = _library()
    key = str(name_or_path).lower()
    if key in lib:
        return model_from_dict(key, lib[key])
    p = Path(name_or_path)
    if is_dir(p) and is_file(p / "config.json"):
        p = p / "config.json"
    if is_file(p):
        where = short(p)
        if p.suffix == ".json":
            try:
                cfg = json.loads(read_text(p, where))
            except json.JSONDecodeError as e:
                raise PerfmodelError(f"{where}: malformed JSON: {e.msg} at line {e.lineno}") from None
            except RecursionError:
                raise PerfmodelError(f"{where}: malformed JSON: nested too deeply") from None
            return model_from_hf_config(cfg, name=p.parent.name if p.name == "config.json" else p.stem, where=where)
        return model_from_dict(p.stem, read_yaml_mapping(p), where=where)
    raise bad_value("model", str(name_or_path), "a file path or one of " + ", ".join(lib))
