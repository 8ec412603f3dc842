"""The engine under torch.compile: the CPU analogue of the `graph` and `fused` execution modes.

- `graph`: the eager operator structure traced once and replayed without Python between the operators
  (torch.compile with the aot_eager backend: the same ATen kernels, no fusion), like a captured CUDA graph.
- `fused`: the fused operator structure (qkv_proj, gate_up_proj, add_norm, RoPE + KV write inside attention)
  compiled by Inductor, which also fuses the elementwise chains into generated C++ loops.
One decoder layer is compiled (dynamic shapes: batch, new tokens and context are symbolic) and replayed for
every layer, because the layers share their shapes; the embedding, mask and LM head run as in eager. The
counts of a compiled forward are those of its structure, which tests/test_engine.py holds equal to the cost
model's; a compiled forward is timed as a whole (its operators are not observable from Python).
Torch backend with FlashAttention (SDPA), dense decoder families without experts.
"""

from __future__ import annotations

from perfmodel.engine.transformer import Transformer
from perfmodel.errors import PerfmodelError

BACKENDS = {"graph": "aot_eager", "fused": "inductor"}


def compiled_forward(model: Transformer, mode: str):
    """forward(ids, cache) running model's layers through torch.compile in `mode` (graph | fused)."""
    if mode not in BACKENDS:
        raise PerfmodelError(f"compiled mode: {mode!r} is not valid; allowed: graph|fused")
    if model.be.name != "torch" or not model.flash:
        raise PerfmodelError("--exec graph|fused on the engine needs --backend torch with --flash")
    if model.spec.is_moe:
        raise PerfmodelError("--exec graph|fused on the engine: mixture-of-experts layers run eager only")
    if (mode == "fused") != model.fused:
        raise PerfmodelError(f"compiled {mode}: needs an engine built with structure="
                             f"{'fused' if mode == 'fused' else 'eager'}")
    import torch

    be, s = model.be, model.spec
    nq, nkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    rope = s.positions == "rope"

    def attend(q, k, v, kc, vc, mask, cos, sin, P: int, first: int):
        if rope:
            half = d // 2
            q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
            k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
        T = q.shape[2]
        kc[:, :, P:P + T] = k
        vc[:, :, P:P + T] = v
        return be.sdpa(q, kc[:, :, first:P + T], vc[:, :, first:P + T], mask, nkv != nq)

    def heads(y, B, T, n):
        return y.reshape(B, T, n, d).transpose(1, 2)

    def eager_layer(x, w, kc, vc, mask, cos, sin, P: int, first: int):
        (an, anb, qw, qb, kw, kb, vw, vb, ow, ob, mn, mnb, gate, up, upb, down, downb) = w
        B, T, _ = x.shape
        h = model._norm("attn_norm", 0, x, an, anb)
        q = heads(model._linear("q_proj", 0, h, qw, qb), B, T, nq)
        k = heads(model._linear("k_proj", 0, h, kw, kb), B, T, nkv)
        v = heads(model._linear("v_proj", 0, h, vw, vb), B, T, nkv)
        a = attend(q, k, v, kc, vc, mask, cos, sin, P, first).transpose(1, 2).reshape(B, T, nq * d)
        x = x + model._linear("o_proj", 0, a, ow, ob)
        h = model._norm("mlp_norm", 0, x, mn, mnb)
        if gate is not None:
            act = be.silu if s.activation == "silu" else be.gelu
            m = model._linear("down_proj", 0, act(model._linear("gate_proj", 0, h, gate)) *
                              model._linear("up_proj", 0, h, up), down)
        else:
            m = model._linear("down_proj", 0, be.gelu(model._linear("up_proj", 0, h, up, upb)), down, downb)
        return x + m

    def fused_layer(x, h, w, nn, nnb, kc, vc, mask, cos, sin, P: int, first: int, last: bool):
        (qkv_w, qkv_b, ow, ob, mn, mnb, gate_up, upb, down, downb) = w
        B, T, _ = x.shape
        y = model._linear("qkv_proj", 0, h, qkv_w, qkv_b)
        q = heads(y[..., :nq * d], B, T, nq)
        k = heads(y[..., nq * d:(nq + nkv) * d], B, T, nkv)
        v = heads(y[..., (nq + nkv) * d:], B, T, nkv)
        a = attend(q, k, v, kc, vc, mask, cos, sin, P, first).transpose(1, 2).reshape(B, T, nq * d)
        x, h = model._add_norm(0, x, model._linear("o_proj", 0, a, ow, ob), mn, mnb)
        m = model._linear("down_proj", 0, model._gate_up(0, h, gate_up, upb), down, downb)
        if last:
            return x + m, None
        return model._add_norm(0, x, m, nn, nnb)

    fn = torch.compile(fused_layer if model.fused else eager_layer, backend=BACKENDS[mode], dynamic=True)
    layers = model.w.layers
    weights = []
    for i, lw in enumerate(layers):
        if model.fused:
            fw = model.fw[i]
            weights.append((fw.qkv, fw.qkv_b, lw.o, lw.o_b, lw.mlp_norm, lw.mlp_norm_b, fw.gate_up,
                            None if s.gated_mlp else lw.up_b, lw.down, lw.down_b))
        else:
            weights.append((lw.attn_norm, lw.attn_norm_b, lw.q, lw.q_b, lw.k, lw.k_b, lw.v, lw.v_b, lw.o, lw.o_b,
                            lw.mlp_norm, lw.mlp_norm_b, lw.gate, lw.up, lw.up_b, lw.down, lw.down_b))

    def forward(ids, cache, all_logits: bool = False, pad=None):
        x, pos, mask, P = model._prologue(ids, cache, pad)
        T = ids.shape[1]
        first = max(0, P - s.sliding_window + 1) if s.sliding_window else 0
        mask_t = torch.as_tensor(mask[..., first:], device=be.device)
        cos, sin = model._rope_tables if rope else (None, None)
        if model.fused:
            h = model._norm("attn_norm", 0, x, layers[0].attn_norm, layers[0].attn_norm_b)
            for i, w in enumerate(weights):
                last = i + 1 == len(layers)
                nxt = layers[min(i + 1, len(layers) - 1)]
                x, h = fn(x, h, w, nxt.attn_norm, nxt.attn_norm_b, cache.k[i], cache.v[i], mask_t, cos, sin, P,
                          first, last)
        else:
            for i, w in enumerate(weights):
                x = fn(x, w, cache.k[i], cache.v[i], mask_t, cos, sin, P, first)
        cache.length = P + T
        return model._epilogue(x, all_logits)

    return forward
