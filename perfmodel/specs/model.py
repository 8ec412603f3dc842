"""ModelSpec: the shape of a transformer, from YAML, a Hugging Face config.json, or the built-in library."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from perfmodel.errors import PerfmodelError, bad_value

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


_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}


def model_from_dict(name: str, d: dict) -> ModelSpec:
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise PerfmodelError(f"model {name}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_FIELDS))}")
    d = {**d, "name": d.get("name", name)}
    missing = [f for f in ("family", "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")
               if f not in d]
    if missing:
        raise PerfmodelError(f"model {name}: missing field {missing[0]!r}")
    d.setdefault("num_kv_heads", d["num_heads"])
    # PyYAML reads 6.74e9 (no exponent sign) as a string; these fields are numbers whatever the spelling.
    for f in ("published_params", "rope_theta", "norm_eps"):
        if isinstance(d.get(f), str):
            try:
                d[f] = float(d[f])
            except ValueError:
                raise bad_value(f"model {name}: {f}", d[f], "a number") from None
    try:
        return ModelSpec(**d)
    except TypeError as e:
        raise PerfmodelError(f"model {name}: {e}") from None


def model_from_hf_config(cfg: dict, name: str = "") -> ModelSpec:
    """Map a Hugging Face config.json (llama, mistral, qwen2, gemma, mixtral, gpt2, deepseek_v2/v3) to a ModelSpec."""
    mt = cfg.get("model_type", "llama")
    name = name or cfg.get("_name_or_path") or mt
    if mt == "gpt2":
        h = cfg["n_embd"]
        return ModelSpec(name=name, family="gpt2", hidden_size=h, num_layers=cfg["n_layer"], num_heads=cfg["n_head"],
                         num_kv_heads=cfg["n_head"], intermediate_size=cfg.get("n_inner") or 4 * h,
                         vocab_size=cfg["vocab_size"], max_position=cfg.get("n_positions", 1024),
                         tied_embeddings=True, norm_eps=cfg.get("layer_norm_epsilon", 1e-5), source="config.json")
    if mt == "bert":
        return ModelSpec(name=name, family="gpt2", architecture="encoder", hidden_size=cfg["hidden_size"],
                         num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                         num_kv_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
                         vocab_size=cfg["vocab_size"], max_position=cfg.get("max_position_embeddings", 512),
                         tied_embeddings=True, source="config.json")
    if mt == "t5":
        return ModelSpec(name=name, family="llama", architecture="encoder-decoder", hidden_size=cfg["d_model"],
                         num_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
                         num_encoder_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
                         num_kv_heads=cfg["num_heads"], head_dim=cfg["d_kv"], intermediate_size=cfg["d_ff"],
                         vocab_size=cfg["vocab_size"], tied_embeddings=cfg.get("tie_word_embeddings", True),
                         gated=cfg.get("feed_forward_proj", "relu").startswith("gated"),
                         position_embedding="relative", max_position=512, source="config.json")
    family = {"mixtral": "mixtral", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}.get(mt, "llama")
    if "hidden_size" not in cfg:
        raise PerfmodelError(f"config.json: model_type {mt!r} lacks hidden_size; supported: llama, mistral, qwen2, "
                             "gemma, mixtral, gpt2, deepseek_v2, deepseek_v3")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    kw = dict(
        name=name, family=family, hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or 0, intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], max_position=cfg.get("max_position_embeddings", 4096),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
        sliding_window=window, rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), activation="gelu" if mt.startswith("gemma") else "silu",
        source="config.json",
    )
    if mt == "mixtral":
        kw.update(num_experts=cfg["num_local_experts"], experts_per_token=cfg["num_experts_per_tok"])
    if family == "deepseek":
        kw.update(attention="mla", q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
                  qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                  v_head_dim=cfg["v_head_dim"], num_experts=cfg.get("n_routed_experts") or 0,
                  experts_per_token=cfg.get("num_experts_per_tok") or 0,
                  num_shared_experts=cfg.get("n_shared_experts") or 0,
                  moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
                  first_dense_layers=cfg.get("first_k_dense_replace", 0))
    return ModelSpec(**kw)


@lru_cache(maxsize=1)
def _library() -> dict:
    text = resources.files("perfmodel.models").joinpath("library.yaml").read_text()
    return yaml.safe_load(text)


def list_models() -> list[ModelSpec]:
    return [model_from_dict(n, d) for n, d in _library().items()]


def _read_yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PerfmodelError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(d, dict):
        raise PerfmodelError(f"{path}: expected a YAML mapping of fields, got {type(d).__name__}")
    return d


def load_model(name_or_path: str | ModelSpec) -> ModelSpec:
    """A library name (case-insensitive), a YAML file, a config.json, or a folder holding config.json."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    lib = _library()
    key = str(name_or_path).lower()
    if key in lib:
        return model_from_dict(key, lib[key])
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").exists():
        p = p / "config.json"
    if p.is_file():
        if p.suffix == ".json":
            try:
                cfg = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise PerfmodelError(f"{p}: malformed JSON: {e.msg} at line {e.lineno}") from None
            try:
                return model_from_hf_config(cfg, name=p.parent.name if p.name == "config.json" else p.stem)
            except KeyError as e:
                raise PerfmodelError(f"{p}: config.json lacks field {e.args[0]!r}") from None
        return model_from_dict(p.stem, _read_yaml(p))
    raise bad_value("model", str(name_or_path), "a file path or one of " + ", ".join(lib))
