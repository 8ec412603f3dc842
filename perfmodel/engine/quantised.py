"""The target model with int8 weights, dequantised on the fly: the speculative draft model.

Why this draft and not the target's first k layers with the shared LM head: on SmolLM2-135M (pydoc prose,
teacher-forced) the first 8/15/20/25 of 30 layers agree with the full model's greedy token 3/11/15/38 % of
the time, far too rarely to pay for the draft steps, while int8 weights agree on ~100 % and int4 (g128) on
77 %. On this CPU, int8 weights are also fast: PyTorch's weight-only kernel (aten._weight_int8pack_mm, bf16
activations) reads a quarter of the fp32 target's weight bytes and dequantises in registers, where a NumPy
dequantise would first write the fp32 matrix out.

Layout (perfmodel.dtypes "int8_channel"): every matmul weight W [in, out] as int8 codes [out, in] with one
bf16 scale per output channel; the tied embedding table [vocab, hidden] is the same layout read per row (its
scale per vocabulary row), so the LM head and the embedding share one int8 tensor. Norm weights stay bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

from perfmodel.engine.backend import TorchBackend
from perfmodel.engine.tracer import Tracer
from perfmodel.engine.transformer import Transformer, Weights
from perfmodel.errors import PerfmodelError
from perfmodel.specs.model import ModelSpec

MATMULS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class Int8Rows:
    """codes [rows, cols] int8 and one scale per row. As a matmul weight (matrix=True) it is W [cols, rows]
    (in = cols, out = rows); as a table (matrix=False) it is the [rows, cols] matrix codes * scale."""

    codes: object
    scales: object
    matrix: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        r, c = tuple(self.codes.shape)
        return (c, r) if self.matrix else (r, c)


def quantise_rows(x, torch) -> Int8Rows:
    """Symmetric int8 per row of x [rows, cols] (a float tensor), scale rounded to bf16 before the codes."""
    x = x.float()
    s = (x.abs().amax(dim=1) / 127.0).clamp_min(1e-12).to(torch.bfloat16)
    codes = (x / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    return Int8Rows(codes, s.contiguous())


class Int8TorchBackend(TorchBackend):
    """The torch backend (bf16 activations) taking Int8Rows weights where a matmul weight or table goes."""

    def __init__(self, device: str = "cpu"):
        super().__init__("bf16", device)

    def matmul(self, a, b):
        if isinstance(b, Int8Rows):
            return self.torch.ops.aten._weight_int8pack_mm(a.contiguous(), b.codes, b.scales)
        return super().matmul(a, b)

    def nbytes(self, x) -> int:
        if isinstance(x, Int8Rows):
            return super().nbytes(x.codes) + super().nbytes(x.scales)
        return super().nbytes(x)

    def swap_last(self, x):
        if isinstance(x, Int8Rows):  # the tied table [vocab, hidden] as the LM head's weight [hidden, vocab]
            return Int8Rows(x.codes, x.scales, matrix=not x.matrix)
        return super().swap_last(x)

    def take(self, table, ids):
        if isinstance(table, Int8Rows):
            return table.codes[ids].to(self.dtype) * table.scales[ids].unsqueeze(-1)
        return super().take(table, ids)

    def gather_nbytes(self, table, rows) -> int:
        if isinstance(table, Int8Rows):  # per gathered row: its codes and its scale
            n = rows.numel() // rows.shape[-1]
            return n * (table.codes.shape[1] * table.codes.element_size() + table.scales.element_size())
        return super().gather_nbytes(table, rows)


def int8_model(spec: ModelSpec, weights: Weights, tracer: Tracer | None = None, flash: bool = True) -> Transformer:
    """The model with every matmul weight and the embedding table int8 per output channel (torch, bf16)."""
    be = Int8TorchBackend()
    torch = be.torch
    m = Transformer(spec, weights, be, flash=flash, tracer=tracer)
    for lw in m.w.layers:
        for name in MATMULS:
            w = getattr(lw, name)
            if w is not None:  # W [in, out] -> codes [out, in]
                setattr(lw, name, quantise_rows(w.transpose(0, 1), torch))
        if lw.experts:
            raise PerfmodelError("--speculative int8: the int8 draft covers dense models only")
    m.w.tok_emb = Int8Rows(*_table(m.w.tok_emb, torch), matrix=False)
    if m.w.lm_head is not None:
        m.w.lm_head = quantise_rows(m.w.lm_head.transpose(0, 1), torch)
    return m


def _table(t, torch):
    q = quantise_rows(t, torch)
    return q.codes, q.scales
