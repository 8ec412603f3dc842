"""FLOPs and bytes of every operator of a transformer forward pass, as pure functions of the shapes.

Counting conventions (the reference engine counts the same way, from its real tensors):
- A matmul [M, K] x [K, N] costs 2*M*N*K FLOPs, plus M*N for a bias.
- Causal attention counts only the (query, key) pairs the mask keeps: a prefill of T tokens after P cached
  ones keeps T*P + T*(T+1)/2 pairs per head (diagonal included), about half of the full T^2, which is what a
  causal kernel computes. A sliding window W caps each query's keys at W; under chunked attention (chunk C) a
  query at position p sees the (p mod C) + 1 keys of its own chunk.
- Layers of different attention types (global, sliding window, chunked: ModelSpec.attention_pattern) are separate
  attention operators with their own layer counts: `attention` over the global layers, `attention_local` over the
  windowed ones, `attention_chunked` over the chunked ones (a model of one type keeps the plain name). The KV
  cache sums over the types: a windowed layer holds at most W tokens, a chunked layer at most C.
- Score soft-capping (Gemma 2) adds 3 FLOPs per kept score (cap*tanh(s/cap)), final-logit soft-capping 3 per
  logit (a logit_softcap operator); attention sinks (gpt-oss) add one score per query and head to the softmax
  (5 FLOPs) and read one logit per head; q/k norms (Qwen3, Gemma 3, Llama 4) are a qk_norm operator over q and k.
- Per kept score: 2*d FLOPs for QK^T, 2*d_v for attention*V, 5 for the softmax (max, subtract, exp, sum, divide).
- Elementwise FLOPs per element: RMSNorm 4, LayerNorm 7, RoPE 3, SiLU*mul 5, GELU 8, GELU*mul 9, residual add 1.
- Bytes: every operator reads its inputs and writes its outputs once (no fusion except inside FlashAttention).
  Without FlashAttention the kernel walks the new queries in blocks of ATTN_BLOCK rows; each block reads the
  keys and values it can see (causal, windowed) and writes its block of scores; softmax reads and writes the
  scores, attention*V reads them again. With FlashAttention the scores never leave on-chip memory and K/V are
  read once.
- Prefill computes logits for the last token of each sequence only, as serving engines do.
- Norm weights and biases are stored in the activation dtype; quantisation applies to matmul weights and
  embeddings (int formats with one fp16 scale per 128 elements, block formats with their block layouts, see
  dtypes); routed experts may have their own format (Precision.experts, else the checkpoint's, e.g. MXFP4).
- A MoE step reads the weights of the distinct experts its tokens route to: E*(1-(1-k/E)^N) expected for N
  tokens, or the exact count when the caller knows the routing.

Execution modes (perfmodel.costmodel.execution) change the operator list only in `fused` mode, where the
fusions serving engines ship are applied: Q/K/V as one qkv_proj matmul; gate/up as one gate_up_proj matmul whose
epilogue applies the SwiGLU/GeGLU activation (up_act_proj for a plain GELU MLP); each residual add fused with the
norm that follows it (add_norm: the sum and the normed output are written, nothing else); RoPE and the KV-cache
write inside FlashAttention (attention reads q and the new k/v once, the cache only for the past tokens). Fused
intermediates are neither written nor read back. `eager` and `graph` run the same operators; they differ in
launch costs only (perfmodel.costmodel.roofline).

All shape arguments may be numpy arrays (they broadcast), so one call evaluates a whole sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from perfmodel.dtypes import elements_bytes, get_dtype, tensor_bytes
from perfmodel.errors import PerfmodelError, bad_value
from perfmodel.specs.model import ModelSpec

FLOPS_PER_ELEMENT = {"rmsnorm": 4, "layernorm": 7, "rope": 3, "silu_mul": 5, "gelu": 8, "gelu_mul": 9,
                     "add": 1, "softmax": 5,
                     # L2 norm (Llama 4 q/k): square, sum, scale, with no weight multiply
                     "l2norm": 3,
                     # cap*tanh(x/cap): divide, tanh, multiply (tanh counted as one, like exp in the softmax)
                     "softcap": 3,
                     # gpt-oss's clamped SwiGLU: clamp gate (1) and up (2), gate*sigmoid(1.702*gate) (5),
                     # (up + 1) * that (2)
                     "swiglu_oai_mul": 10}
INDEX_BYTES = 8  # int64 token ids and expert indices


@dataclass(frozen=True)
class Precision:
    weights: str = "bf16"
    activations: str = "bf16"
    kv_cache: str = "bf16"
    compute: str | None = None  # the weight matmuls' tensor-core dtype; None: the activations' (see compute_dtype)
    experts: str | None = None  # routed experts' weight format; None: the model's checkpoint format, else weights

    def __post_init__(self) -> None:
        get_dtype(self.weights, "weight dtype")
        if get_dtype(self.activations, "activation dtype").is_block:
            raise bad_value("activation dtype", self.activations, "fp32|tf32|bf16|fp16|fp8|int8|int4")
        get_dtype(self.kv_cache, "kv-cache dtype")
        if self.experts is not None:
            get_dtype(self.experts, "expert dtype")

    @property
    def act_bytes(self) -> int:
        return get_dtype(self.activations).bits // 8 or 1

    @property
    def compute_dtype(self) -> str:
        """The dtype whose tensor peak the weight matmuls use: `compute` when set (dtypes.resolve_compute_dtype
        picks it: native fp8/fp4 tensor cores where the framework and the hardware have them), else the
        activation dtype (quantised weights dequantised on the fly)."""
        return self.compute or self.activations

    def expert_dtype(self, model: ModelSpec) -> str:
        return self.experts or model.expert_weight_dtype or self.weights


@dataclass
class Op:
    """One operator of one phase. layers: how many times it runs per forward pass."""

    name: str
    kind: str  # matmul | attention | elementwise | memory
    layers: int
    flops: object
    weight_bytes: object = 0
    act_read_bytes: object = 0
    kv_read_bytes: object = 0
    act_write_bytes: object = 0
    kv_write_bytes: object = 0
    min_dim: object = None  # smallest matmul dimension, for shape-dependent efficiency
    group: str = "layer"  # layer | embed | head | host
    host_s: float = 0.0  # kind "host" only: seconds of host time (launches, glue), no FLOPs or bytes
    variant: str = ""  # how this model implements the operator (op_variant): the key of its dispatch cost
    calls: object = 1  # kernel calls it makes (the blocked attention kernel: one per sequence, KV head, block)
    link_bytes: object = 0  # kind "comm" only: bytes one call moves over the interconnect
    comm_s: object = 0.0  # kind "comm" only: seconds of one call on the link

    @property
    def read_bytes(self):
        return self.weight_bytes + self.act_read_bytes + self.kv_read_bytes

    @property
    def write_bytes(self):
        return self.act_write_bytes + self.kv_write_bytes

    @property
    def bytes(self):
        return self.read_bytes + self.write_bytes


def _chunk_prefix_pairs(n, chunk):
    """Pairs of positions 0..n-1 under chunked attention: position p sees the (p mod chunk) + 1 keys of its chunk."""
    q, r = n // chunk, n % chunk
    return q * (chunk * (chunk + 1) // 2) + r * (r + 1) // 2


_NORMS = {"attn_norm", "mlp_norm", "final_norm", "add_norm", "cross_norm", "attn_post_norm", "mlp_post_norm"}
_BIASED = {"q_proj", "k_proj", "v_proj", "qkv_proj"}


def op_variant(model: ModelSpec, name: str) -> str:
    """The implementation an operator has in this model, where families differ (LayerNorm vs RMSNorm, a matmul
    with a bias, GELU vs SiLU, learned positions): a measured per-call cost is keyed by name:variant."""
    if name in _NORMS:
        return model.norm
    if name in _BIASED and (model.qkv_bias or model.linear_bias):
        return "bias"
    if model.linear_bias and name in ("o_proj", "up_proj", "down_proj", "up_act_proj"):
        return "bias"
    if name in ("act", "act_mul", "gate_up_proj", "up_act_proj", "expert_act_mul", "expert_gate_up"):
        return model.activation
    if name == "embed":
        return model.positions
    return ""


def attended_pairs(past, new, window=None, causal: bool = True, chunk=None):
    """Causal (query, key) pairs: sum over the new tokens' positions p of min(p+1, window), or of
    (p mod chunk) + 1 under chunked attention. Bidirectional (encoder) attention keeps every pair."""
    past, new = np.asarray(past), np.asarray(new)
    if not causal:
        return new * (past + new)
    if chunk is not None:
        return _chunk_prefix_pairs(past + new, chunk) - _chunk_prefix_pairs(past, chunk)
    if window is None:
        return new * past + new * (new + 1) // 2
    first = past + 1  # key count of the first new query before the window caps it
    n_below = np.clip(window - past, 0, new)  # queries whose key count is still <= window
    return n_below * first + n_below * (n_below - 1) // 2 + (new - n_below) * window


def materialised_keys(past, new, window=None, chunk=None):
    """Keys a non-flash kernel holds scores for: all visible keys, the window band's span, or the keys from the
    start of the first new query's chunk."""
    total = np.asarray(past) + np.asarray(new)
    if chunk is not None:
        return total - chunk * (np.asarray(past) // chunk)
    if window is None:
        return total
    return np.minimum(total, window + np.asarray(new) - 1)


# batch x tokens x tokens below which every int64 count stays below 2**63: attention FLOPs are at most
# 4 x heads x head_dim (2**15) x layers (2**7) = 2**24 per (query, key) pair
_EXACT_WORK = 2.0**38


def count_arrays(batch, *tokens):
    """The workload's counts as arrays: int64 (exact) while batch x tokens x tokens stays small enough that
    no FLOP or byte count (x layers x heads x dims) can pass 2**63, else float64. int64 arrays wrap silently:
    a batch of 16 M prompts of 16 M tokens would otherwise print negative FLOPs."""
    arrays = [np.asarray(x) for x in (batch, *tokens)]
    peak = [float(np.max(np.abs(a))) if a.size else 0.0 for a in arrays]
    longest = max([1.0, *peak[1:]])
    if any(a.dtype.kind == "f" for a in arrays) or peak[0] * 2 * longest * longest >= _EXACT_WORK:
        return tuple(a.astype(np.float64) for a in arrays)
    return tuple(arrays)


ATTN_BLOCK = 128  # query rows per block of the non-flash causal kernel


def _block_bounds(past, new, window, j, chunk=None):
    """Rows and keys of query block j of the blocked causal kernel (keys: the band the block can see)."""
    r0 = j * ATTN_BLOCK
    r1 = np.minimum(new, r0 + ATTN_BLOCK)
    rows = np.maximum(r1 - r0, 0)
    hi = past + r1
    if chunk is not None:  # from the chunk start of the block's first query
        lo = chunk * ((past + r0) // chunk)
    else:
        lo = 0 if window is None else np.maximum(0, past + r0 - window + 1)
    return rows, np.where(rows > 0, hi - lo, 0)


def blocked_scores(past, new, window=None, causal: bool = True, chunk=None):
    """(score elements, key reads) per head of the non-flash kernel, which walks the new queries in blocks of
    ATTN_BLOCK rows and, for each, materialises scores against only the keys that block can see."""
    past, new = np.asarray(past), np.asarray(new)
    if not causal:
        return new * (past + new), -(-new // ATTN_BLOCK) * (past + new)
    if window is None and chunk is None:  # closed form: full blocks then the last, partial one
        nb = -(-new // ATTN_BLOCK)
        full = np.maximum(nb - 1, 0)
        last_rows = new - full * ATTN_BLOCK
        scores = ATTN_BLOCK * (full * past + ATTN_BLOCK * full * (full + 1) // 2) + last_rows * (past + new)
        keys = full * past + ATTN_BLOCK * full * (full + 1) // 2 + (past + new)
        return scores, keys
    scores, keys = 0, 0
    for j in range(int(-(-np.max(new) // ATTN_BLOCK))):
        rows, k = _block_bounds(past, new, window, j, chunk)
        scores = scores + rows * k
        keys = keys + k
    return scores, keys


def cached_tokens(tokens, window=None):
    """Tokens a KV cache holds: all of them, or the last `window` under sliding-window attention."""
    return tokens if window is None else np.minimum(tokens, window)


def expected_experts_touched(num_experts: int, k: int, tokens):
    """Expected distinct experts hit by `tokens` independent top-k routings of uniform load."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** np.asarray(tokens, dtype=np.float64))


def kv_bytes_per_token_layer(model: ModelSpec, kv_dtype: str) -> int:
    """One token's K and V in one layer: whole blocks/groups per head, scales included (a block format's
    per-tensor scale belongs to the layer's cache, not to a token, and is not counted)."""
    if model.is_mla:
        return elements_bytes(model.kv_lora_rank, kv_dtype) + elements_bytes(model.qk_rope_head_dim, kv_dtype)
    return 2 * model.num_kv_heads * elements_bytes(model.head_dim, kv_dtype)


def kv_cache_bytes(model: ModelSpec, tokens, batch=1, kv_dtype: str = "bf16"):
    """2*kv_heads*head_dim*bytes per token and layer (the MLA latent for MLA), summed over the layer types: a
    global layer holds every token, a sliding layer at most its window, a chunked layer at most one chunk;
    times batch."""
    batch, tokens = count_arrays(batch, tokens)
    held = sum(n * cached_tokens(tokens, model.cache_cap(t)) for t, n in model.layer_type_counts().items())
    return batch * held * kv_bytes_per_token_layer(model, kv_dtype)


def weight_memory_bytes(model: ModelSpec, precision: Precision) -> int:
    """Bytes of all weights: matmul weights and embeddings in the weight dtype (routed experts in the expert
    dtype), norms, biases and a vision tower in the activation dtype."""
    w, a = precision.weights, precision.act_bytes
    mm = model.matmul_params(active=False) - model.vocab_size * model.hidden_size  # no LM head (counted below)
    experts = model.expert_matmul_params()
    emb = model.embedding_params() + model.lm_head_params()
    other = model.param_count() - mm - emb
    ew = precision.expert_dtype(model)
    if not experts or ew == w:
        return tensor_bytes(mm, w) + tensor_bytes(emb, w) + other * a
    return tensor_bytes(mm - experts, w) + tensor_bytes(experts, ew) + tensor_bytes(emb, w) + other * a


class _Builder:
    """Collects the operators of one phase; helpers keep each formula in one place."""

    def __init__(self, model: ModelSpec, precision: Precision):
        self.m, self.p = model, precision
        self.a = precision.act_bytes
        self.ops: list[Op] = []

    def wbytes(self, n, row=None):
        """row: elements per row along the input dimension, for formats with a scale per row (int8_channel)."""
        dt = get_dtype(self.p.weights)
        return tensor_bytes(n, dt, row if dt.per_row else None)

    def matmul(self, name, layers, tokens, k, n, bias=False, weight_elems=None, weight_bytes=None,
               group="layer", rows_per_weight=None, epilogue_flops=0, out_cols=None):
        """[tokens, k] x [k, n] with weights read once. A fused epilogue (an activation applied before the
        result leaves the kernel) adds epilogue_flops and writes only out_cols columns per row."""
        wb = (self.wbytes(k * n if weight_elems is None else weight_elems, k) if weight_bytes is None
              else weight_bytes)
        flops = 2 * tokens * k * n + (tokens * n if bias else 0) + epilogue_flops
        cols = n if out_cols is None else out_cols
        self.ops.append(Op(name, "matmul", layers, flops, weight_bytes=wb + (n * self.a if bias else 0),
                           act_read_bytes=tokens * k * self.a, act_write_bytes=tokens * cols * self.a,
                           min_dim=np.minimum(tokens if rows_per_weight is None else rows_per_weight, min(k, n)),
                           group=group))

    def elementwise(self, name, layers, elems, per_elem, n_inputs=1, extra_read=0, weight_bytes=0, group="layer",
                    extra_write=0):
        self.ops.append(Op(name, "elementwise", layers, elems * per_elem, weight_bytes=weight_bytes,
                           act_read_bytes=n_inputs * elems * self.a + extra_read,
                           act_write_bytes=elems * self.a + extra_write, group=group))

    def norm(self, name, layers, tokens, dim, group="layer", residual=False):
        """A norm; with residual=True the residual add before it is fused in: two inputs read, the sum (the
        residual stream) and the normed output written."""
        kind = self.m.norm
        n_params = dim * (2 if kind == "layernorm" else 1)
        per = FLOPS_PER_ELEMENT[kind] + (FLOPS_PER_ELEMENT["add"] if residual else 0)
        self.elementwise(name, layers, tokens * dim, per, n_inputs=2 if residual else 1,
                         weight_bytes=n_params * self.a, group=group,
                         extra_write=tokens * dim * self.a if residual else 0)

    def softmax_cost(self, pairs, queries, n_q):
        """(FLOPs, weight bytes) of the softmax over `pairs` kept scores of `queries` query rows (times heads):
        5 per score, the soft-cap's 3 more per score when the model caps its scores, and one more score per query
        row (the learned sink, read once per layer: n_q values) with attention sinks."""
        m = self.m
        flops = pairs * (FLOPS_PER_ELEMENT["softmax"] + (FLOPS_PER_ELEMENT["softcap"] if m.attn_logit_softcap else 0))
        if not m.attention_sinks:
            return flops, 0
        return flops + queries * FLOPS_PER_ELEMENT["softmax"], n_q * self.a

    def attention(self, layers, batch, new, past, n_q, n_kv, d_qk, d_v, kv_read_per_key, flash, window,
                  kv_is_cache=True, causal=True, prefix="", chunk=None, suffix=""):
        """Score, softmax and weighted sum over the cache; kv_read_per_key: bytes of K and V per key per sequence.
        A chunked layer (chunk) sees only the keys of its query's chunk. The model's score soft-cap adds its
        FLOPs per kept score; attention sinks add one score per query and head to the softmax."""
        a = self.a
        pairs = batch * attended_pairs(past, new, window, causal, chunk) * n_q
        keys = materialised_keys(past, new, window, chunk) if causal else np.asarray(past) + np.asarray(new)
        q_bytes = batch * new * n_q * d_qk * a
        kv_bytes = batch * keys * kv_read_per_key
        out_bytes = batch * new * n_q * d_v * a
        kv_field = "kv_read_bytes" if kv_is_cache else "act_read_bytes"
        softmax_flops, sink_bytes = self.softmax_cost(pairs, batch * new * n_q, n_q)
        if flash:
            flops = pairs * (2 * d_qk + 2 * d_v) + softmax_flops
            op = Op(f"{prefix}attention{suffix}", "attention", layers, flops, weight_bytes=sink_bytes,
                    act_read_bytes=q_bytes, act_write_bytes=out_bytes, min_dim=np.minimum(new, d_qk))
            setattr(op, kv_field, getattr(op, kv_field) + kv_bytes)
            self.ops.append(op)
            return
        score_elems, key_reads = blocked_scores(past, new, window, causal, chunk)
        scores = batch * n_q * score_elems * a
        kv_bytes = batch * key_reads * kv_read_per_key  # each query block reads its band of K and V
        k_share = kv_bytes * d_qk // (d_qk + d_v) if not self.m.is_mla else kv_bytes
        v_share = kv_bytes - k_share if not self.m.is_mla else kv_bytes
        blocks = -(-np.asarray(new) // ATTN_BLOCK)
        qk = Op(f"{prefix}qk{suffix}", "attention", layers, pairs * 2 * d_qk, act_read_bytes=q_bytes,
                act_write_bytes=scores, min_dim=np.minimum(new, d_qk), calls=batch * n_kv * blocks)
        av = Op(f"{prefix}av{suffix}", "attention", layers, pairs * 2 * d_v, act_read_bytes=scores,
                act_write_bytes=out_bytes, min_dim=np.minimum(new, d_v), calls=batch * n_kv * blocks)
        setattr(qk, kv_field, getattr(qk, kv_field) + k_share)
        setattr(av, kv_field, getattr(av, kv_field) + v_share)
        sm = Op(f"{prefix}softmax{suffix}", "elementwise", layers, softmax_flops, weight_bytes=sink_bytes,
                act_read_bytes=scores, act_write_bytes=scores, calls=blocks)
        self.ops += [qk, sm, av]


def attention_groups(model: ModelSpec) -> list[tuple[str, int, int | None, int | None]]:
    """(operator-name suffix, layers, window, chunk) per attention type present. A model whose layers are all of
    one type keeps the plain names (attention, qk, softmax, av); mixed models name global layers plainly and
    sliding / chunked layers with _local / _chunked."""
    counts = model.layer_type_counts()
    suffix = {"global": "", "sliding": "_local", "chunked": "_chunked"}
    out = []
    for t, n in counts.items():
        window, chunk = model.attention_span(t)
        out.append(("" if len(counts) == 1 else suffix[t], n, window, chunk))
    return out


def phase_ops(model: ModelSpec, batch, new_tokens, past_tokens=0, precision: Precision | None = None,
              flash: bool = True, experts_touched=None, all_logits: bool = False, phase: str | None = None,
              include_sampling: bool = True, causal: bool = True, head: bool = True, cache: bool = True,
              cross_tokens=None, kv_method=None, exec_mode: str = "eager") -> list[Op]:
    """Operators of one forward pass: `new_tokens` per sequence after `past_tokens` already cached.

    Prefill is new_tokens=input, past_tokens=0; a decode step is new_tokens=1, past_tokens=context-1.
    `phase` selects MLA's form (naive for prefill, weight-absorbed for decode); by default decode iff new_tokens==1.
    An encoder pass is causal=False, head=False, cache=False. A T5-style decoder passes cross_tokens (the encoder
    output length): each layer adds cross-attention over a cross K/V cache, projected from the encoder output in
    the decoder's first step (phase prefill). exec_mode "fused" applies the serving fusions (module docstring).
    """
    from perfmodel.costmodel.execution import check_exec_mode

    fuse = check_exec_mode(exec_mode) == "fused"
    p = precision or Precision()
    m = model
    b = _Builder(m, p)
    a = p.act_bytes
    B, T, P = count_arrays(batch, new_tokens, past_tokens)
    N = B * T
    if phase is None:
        phase = "decode" if np.all(T == 1) else "prefill"
    L, h = m.num_layers, m.hidden_size
    kv_tok = kv_bytes_per_token_layer(m, p.kv_cache)

    # embedding: gather rows (plus the learned position rows for GPT-2)
    emb_read = N * b.wbytes(h, h)
    emb_flops = 0
    if m.positions == "learned":
        emb_read = emb_read + N * b.wbytes(h, h)
        emb_flops = N * h
    b.ops.append(Op("embed", "memory", 1, emb_flops, weight_bytes=emb_read, act_read_bytes=N * INDEX_BYTES,
                    act_write_bytes=N * h * a, group="embed"))

    # fused: each residual add joins the norm after it (the previous layer's MLP residual joins this layer's
    # attn_norm), so only the first layer's input norm and the last layer's MLP residual stand alone
    fuse_norms = fuse and cross_tokens is None
    b.norm("attn_norm", 1 if fuse_norms else L, N, h)
    if m.is_mla:
        _mla_attention(b, L, B, T, P, N, flash, phase, kv_tok)
    else:
        nq, nkv, d = m.num_heads, m.num_kv_heads, m.head_dim
        bias = m.qkv_bias or m.linear_bias
        if fuse:
            b.matmul("qkv_proj", L, N, h, (nq + 2 * nkv) * d, bias=bias)
        else:
            b.matmul("q_proj", L, N, h, nq * d, bias=bias)
            b.matmul("k_proj", L, N, h, nkv * d, bias=bias)
            b.matmul("v_proj", L, N, h, nkv * d, bias=bias)
        if m.qk_norm:
            _qk_norm(b, N)
        compressed = kv_method is not None and kv_method.kind != "dense"
        if compressed and m.attention_pattern:
            raise PerfmodelError(f"model {m.name}: KV compression over mixed attention layer types is not expressed")
        if fuse and flash and cache and causal and not compressed:
            for suffix, layers, window, chunk in attention_groups(m):
                is_global = window is None and chunk is None
                _fused_attention(b, layers, B, T, P, flash, window, chunk=chunk, suffix=suffix,
                                 rope=m.positions == "rope" and not (m.global_nope and is_global))
        else:
            if m.rope_layers:
                b.elementwise("rope", m.rope_layers, N * (nq + nkv) * d, FLOPS_PER_ELEMENT["rope"],
                              extra_read=2 * N * d * a)
            if cache:
                b.ops.append(Op("kv_write", "memory", L, 0, act_read_bytes=N * 2 * nkv * d * a,
                                kv_write_bytes=N * kv_tok))
            if compressed:
                _compressed_attention(b, L, B, T, P, kv_method, flash, phase)
            else:
                for suffix, layers, window, chunk in attention_groups(m):
                    b.attention(layers, B, T, P, nq, nkv, d, d, kv_tok if cache else 2 * nkv * d * a, flash, window,
                                kv_is_cache=cache, causal=causal, chunk=chunk, suffix=suffix)
        b.matmul("o_proj", L, N, nq * d, h, bias=m.linear_bias or m.o_bias)
    if m.sandwich_norm:
        b.norm("attn_post_norm", L, N, h)
    if fuse_norms:
        b.norm("add_norm", 2 * L - 1, N, h, residual=True)
    else:
        b.elementwise("attn_residual", L, N * h, FLOPS_PER_ELEMENT["add"], n_inputs=2)
        if cross_tokens is not None:
            _cross_attention(b, L, B, N, np.asarray(cross_tokens), flash, phase)
        b.norm("mlp_norm", L, N, h)
    if m.dense_layers:
        _dense_mlp(b, m.dense_layers, N, m.intermediate_size, "", fuse)
    if m.moe_layers:
        _moe(b, m.moe_layers, N, experts_touched, fuse)
    if m.sandwich_norm:
        b.norm("mlp_post_norm", L, N, h)
    b.elementwise("mlp_residual", 1 if fuse_norms else L, N * h, FLOPS_PER_ELEMENT["add"], n_inputs=2)

    if not head:  # an encoder's output is its last hidden state
        b.norm("final_norm", 1, N, h, group="head")
        return _tag_variants(m, b.ops)
    n_logits = N if all_logits else B
    b.norm("final_norm", 1, n_logits, h, group="head")
    b.matmul("lm_head", 1, n_logits, h, m.vocab_size, group="head")
    if m.final_logit_softcap:
        b.elementwise("logit_softcap", 1, n_logits * m.vocab_size, FLOPS_PER_ELEMENT["softcap"], group="head")
    if include_sampling:
        b.ops.append(Op("sample", "elementwise", 1, n_logits * m.vocab_size,
                        act_read_bytes=n_logits * m.vocab_size * a, act_write_bytes=n_logits * INDEX_BYTES,
                        group="head"))
    return _tag_variants(m, b.ops)


def _tag_variants(m: ModelSpec, ops: list[Op]) -> list[Op]:
    for o in ops:
        o.variant = op_variant(m, o.name)
    return ops


def _fused_attention(b: _Builder, L, B, T, P, flash, window, chunk=None, suffix="", rope=None):
    """RoPE and the KV-cache write inside FlashAttention: q and the new k/v are read once from the qkv output
    (with the rope tables), rotated and written to the cache inside the kernel; the cache is read only for the
    keys cached before this step. `rope` False: layers without rotation (Llama 4's NoPE global layers)."""
    m, a = b.m, b.a
    nq, nkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    kv_tok = kv_bytes_per_token_layer(m, b.p.kv_cache)
    N = B * T
    pairs = B * attended_pairs(P, T, window, chunk=chunk) * nq
    past_keys = materialised_keys(P, T, window, chunk) - T  # cached keys the new queries can see
    softmax_flops, sink_bytes = b.softmax_cost(pairs, N * nq, nq)
    flops = pairs * (2 * d + 2 * d) + softmax_flops
    act_read = N * (nq + 2 * nkv) * d * a
    if rope is None:
        rope = m.positions == "rope"
    if rope:
        flops = flops + N * (nq + nkv) * d * FLOPS_PER_ELEMENT["rope"]
        act_read = act_read + 2 * N * d * a
    b.ops.append(Op(f"attention{suffix}", "attention", L, flops, weight_bytes=sink_bytes, act_read_bytes=act_read,
                    kv_read_bytes=B * past_keys * kv_tok, act_write_bytes=N * nq * d * a, kv_write_bytes=N * kv_tok,
                    min_dim=np.minimum(T, d)))


def _qk_norm(b: _Builder, N):
    """The per-head norm of q and k after their projections (Qwen3, Gemma 3: RMSNorm with a head_dim weight each;
    Llama 4: an unweighted L2 norm, on its RoPE layers only)."""
    m = b.m
    kind = "rmsnorm" if m.qk_norm == "rmsnorm" else "l2norm"
    b.elementwise("qk_norm", m.qk_norm_layers, N * (m.num_heads + m.num_kv_heads) * m.head_dim,
                  FLOPS_PER_ELEMENT[kind], weight_bytes=m.qk_norm_params() * b.a)


def _act_key(m: ModelSpec) -> str:
    """FLOPS_PER_ELEMENT key of a gated MLP's activation-times-up."""
    return {"silu": "silu_mul", "swiglu_oai": "swiglu_oai_mul"}.get(m.activation, "gelu_mul")


def _compressed_attention(b: _Builder, L, B, T, P, method, flash, phase):
    """Attention over a compressed cache. Prefill attends densely, then compresses everything but the window;
    a decode step reads the compressed history (decompressing it on chip: one FLOP per element restored) and
    the dense window, and compresses the token that leaves the window."""
    from perfmodel.costmodel.kv_compression import (attended_keys, compressed_tokens, decode_read_bytes_per_layer,
                                                    kv_stored_bytes_per_layer)

    m, a = b.m, b.a
    nq, nkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    kv_tok = kv_bytes_per_token_layer(m, b.p.kv_cache)
    if phase == "prefill":
        b.attention(L, B, T, P, nq, nkv, d, d, kv_tok, flash, None)
        done = compressed_tokens(method, np.asarray(P) + T)
        stored = kv_stored_bytes_per_layer(m, method, np.asarray(P) + T, B, b.p.kv_cache)
        b.ops.append(Op("kv_compress", "elementwise", L, 4 * B * done * 2 * nkv * d,
                        kv_read_bytes=B * done * kv_tok, kv_write_bytes=stored - B * (np.asarray(P) + T - done)
                        * kv_tok))
        return
    keys = attended_keys(method, P)
    pairs = B * T * keys * nq  # a decode step: every kept key
    done = compressed_tokens(method, P)  # the cache compresses after each forward
    read = decode_read_bytes_per_layer(m, method, P, B, b.p.kv_cache)
    restored = B * done * 2 * nkv * d if method.kind in ("per-token", "per-channel", "kivi") else 0
    flops = pairs * (4 * d + FLOPS_PER_ELEMENT["softmax"]) + restored
    b.ops.append(Op("attention", "attention", L, flops, act_read_bytes=B * T * nq * d * a, kv_read_bytes=read,
                    act_write_bytes=B * T * nq * d * a, min_dim=np.minimum(T, d)))
    # the token leaving the window is compressed: read it, write its compressed form (amortised per step)
    per_tok = kv_stored_bytes_per_layer(m, method, method.window + 64 * 4, 1, b.p.kv_cache) - \
        kv_stored_bytes_per_layer(m, method, method.window + 64 * 4 - 1, 1, b.p.kv_cache)
    b.ops.append(Op("kv_compress", "elementwise", L, 4 * B * 2 * nkv * d, kv_read_bytes=B * kv_tok,
                    kv_write_bytes=B * np.maximum(per_tok, 0)))


def _cross_attention(b: _Builder, L, B, N, enc, flash, phase):
    """T5 decoder cross-attention: queries from the decoder, keys/values from the encoder output, cached once."""
    m, h, a = b.m, b.m.hidden_size, b.a
    nq, nkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    kv_tok = kv_bytes_per_token_layer(m, b.p.kv_cache)
    b.norm("cross_norm", L, N, h)
    if phase == "prefill":  # project the encoder output into the cross K/V cache once per request
        b.matmul("cross_k_proj", L, B * enc, h, nkv * d)
        b.matmul("cross_v_proj", L, B * enc, h, nkv * d)
        b.ops.append(Op("cross_kv_write", "memory", L, 0, act_read_bytes=B * enc * 2 * nkv * d * a,
                        kv_write_bytes=B * enc * kv_tok))
    b.matmul("cross_q_proj", L, N, h, nq * d)
    # every decoder query sees every encoder position: non-causal over enc keys, no new keys of its own
    b.attention(L, B, N // np.maximum(B, 1), enc - N // np.maximum(B, 1), nq, nkv, d, d, kv_tok, flash, None,
                causal=False, prefix="cross_")
    b.matmul("cross_o_proj", L, N, nq * d, h)
    b.elementwise("cross_residual", L, N * h, FLOPS_PER_ELEMENT["add"], n_inputs=2)


def _dense_mlp(b: _Builder, layers, N, ffn, prefix, fuse=False):
    m, h = b.m, b.m.hidden_size
    if fuse and m.gated_mlp:  # one [h, 2*ffn] matmul whose epilogue applies act(gate) * up
        act = _act_key(m)
        b.matmul(f"{prefix}gate_up_proj", layers, N, h, 2 * ffn, epilogue_flops=N * ffn * FLOPS_PER_ELEMENT[act],
                 out_cols=ffn)
        b.matmul(f"{prefix}down_proj", layers, N, ffn, h)
        return
    if fuse:
        b.matmul(f"{prefix}up_act_proj", layers, N, h, ffn, bias=m.linear_bias,
                 epilogue_flops=N * ffn * FLOPS_PER_ELEMENT["gelu"])
        b.matmul(f"{prefix}down_proj", layers, N, ffn, h, bias=m.linear_bias)
        return
    if m.gated_mlp:
        b.matmul(f"{prefix}gate_proj", layers, N, h, ffn)
        b.matmul(f"{prefix}up_proj", layers, N, h, ffn)
        act = _act_key(m)
        b.elementwise(f"{prefix}act_mul", layers, N * ffn, FLOPS_PER_ELEMENT[act], n_inputs=2)
        b.matmul(f"{prefix}down_proj", layers, N, ffn, h)
    else:
        b.matmul(f"{prefix}up_proj", layers, N, h, ffn, bias=m.linear_bias)
        b.elementwise(f"{prefix}act", layers, N * ffn, FLOPS_PER_ELEMENT["gelu"])
        b.matmul(f"{prefix}down_proj", layers, N, ffn, h, bias=m.linear_bias)


def _moe(b: _Builder, layers, N, experts_touched, fuse=False):
    m, h, a = b.m, b.m.hidden_size, b.a
    E, k, f = m.num_experts, m.experts_per_token, m.moe_intermediate_size
    touched = expected_experts_touched(E, k, N) if experts_touched is None else np.asarray(experts_touched)
    b.matmul("router", layers, N, h, E, bias=m.moe_bias)
    b.ops.append(Op("router_topk", "elementwise", layers, N * E * FLOPS_PER_ELEMENT["softmax"],
                    act_read_bytes=N * E * a, act_write_bytes=N * k * (a + INDEX_BYTES)))
    routed = N * k  # token-expert assignments
    act = _act_key(m)
    # the weight bytes are those of the distinct experts touched, however many tokens each one serves, in the
    # experts' format (gpt-oss: MXFP4); expert biases (gpt-oss) are read per touched expert, added per row
    per_expert = routed / np.maximum(touched, 1)  # rows each expert's matmul sees
    ew = b.p.expert_dtype(m)

    def wb(k, n):
        return touched * (tensor_bytes(k * n, ew) + (n * a if m.moe_bias else 0))

    bias = (lambda n: routed * n) if m.moe_bias else (lambda n: 0)  # noqa: E731
    if fuse:
        b.matmul("expert_gate_up", layers, routed, h, 2 * f, weight_bytes=wb(h, 2 * f), rows_per_weight=per_expert,
                 epilogue_flops=bias(2 * f) + routed * f * FLOPS_PER_ELEMENT[act], out_cols=f)
    else:
        b.matmul("expert_gate", layers, routed, h, f, weight_bytes=wb(h, f), rows_per_weight=per_expert,
                 epilogue_flops=bias(f))
        b.matmul("expert_up", layers, routed, h, f, weight_bytes=wb(h, f), rows_per_weight=per_expert,
                 epilogue_flops=bias(f))
        b.elementwise("expert_act_mul", layers, routed * f, FLOPS_PER_ELEMENT[act], n_inputs=2)
    b.matmul("expert_down", layers, routed, f, h, weight_bytes=wb(f, h), rows_per_weight=per_expert,
             epilogue_flops=bias(h))
    b.ops.append(Op("moe_combine", "elementwise", layers, 2 * routed * h,
                    act_read_bytes=routed * h * a + routed * a, act_write_bytes=N * h * a))
    if m.num_shared_experts:
        _dense_mlp(b, layers, N, m.num_shared_experts * f, "shared_", fuse)


def _mla_attention(b: _Builder, L, B, T, P, N, flash, phase, kv_tok):
    """DeepSeek multi-head latent attention. The cache holds the kv_lora latent plus the shared RoPE key.

    Prefill expands the latent into full per-head K/V (kv_b_proj) and attends as MHA. Decode absorbs
    kv_b_proj into the query and output sides and attends over the latent directly, as DeepSeek serves it.
    """
    m, h, a = b.m, b.m.hidden_size, b.a
    nq, r, c = m.num_heads, m.qk_rope_head_dim, m.kv_lora_rank
    dn, dv, dqk = m.qk_nope_head_dim, m.v_head_dim, m.qk_head_dim
    if m.q_lora_rank:
        b.matmul("q_a_proj", L, N, h, m.q_lora_rank)
        b.norm("q_a_norm", L, N, m.q_lora_rank)
        b.matmul("q_b_proj", L, N, m.q_lora_rank, nq * dqk)
    else:
        b.matmul("q_proj", L, N, h, nq * dqk)
    b.matmul("kv_a_proj", L, N, h, c + r)
    b.norm("kv_a_norm", L, N, c)
    b.elementwise("rope", L, N * (nq + 1) * r, FLOPS_PER_ELEMENT["rope"], extra_read=2 * N * r * a)
    b.ops.append(Op("kv_write", "memory", L, 0, act_read_bytes=N * (c + r) * a, kv_write_bytes=N * kv_tok))
    W = m.sliding_window
    if phase == "prefill":
        keys = materialised_keys(P, T, W)
        b.matmul("kv_b_proj", L, B * keys, c, nq * (dn + dv))
        # expanded K (nope + shared rope part) and V are activations here, not cache reads
        b.attention(L, B, T, P, nq, nq, dqk, dv, nq * (dqk + dv) * a, flash, W, kv_is_cache=False)
        b.matmul("o_proj", L, N, nq * dv, h)
    else:
        b.matmul("q_absorb", L, N * nq, dn, c, weight_elems=nq * dn * c)
        b.attention(L, B, T, P, nq, 1, c + r, c, kv_tok, flash, W)
        b.matmul("out_absorb", L, N * nq, c, dv, weight_elems=nq * c * dv)
        b.matmul("o_proj", L, N, nq * dv, h)
