"""The cost of one ragged serving step: several sequences, each with its own new tokens after its own cached
ones, run as ONE forward (what continuous-batching servers and perfmodel's serving loop do).

Everything but attention sees the step's tokens as one batch: the weight matmuls, norms and residuals of a
[1, total new tokens] pass, so the weights are read once per step, not once per sequence. Attention runs per
sequence over that sequence's own cache (each (new, past) pair's causal pairs and KV reads). Only each
sequence's last token goes through the final norm, the LM head and sampling. A decode-only step of B
sequences at context c is phase_ops(B, 1, c-1) up to how attention is launched; a lone prefill is
phase_ops(1, T, 0).

Launch costs follow the mode: eager launches each sequence's attention from the host (per-sequence dispatch,
as the reference engine's loop does), graph/fused modes run one varlen kernel over all sequences (their
roofline times add up, with no per-sequence floor).
"""

from __future__ import annotations

import numpy as np

from perfmodel.costmodel.execution import launches_per_op
from perfmodel.costmodel.hierarchy import weight_footprint
from perfmodel.costmodel.operators import Op, Precision, phase_ops
from perfmodel.costmodel.roofline import op_timing, op_timings
from perfmodel.errors import PerfmodelError
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec


def is_attention(op: Op) -> bool:
    """The per-sequence part of a layer: score, softmax, weighted sum (or the one FlashAttention operator)."""
    return op.group == "layer" and (op.kind == "attention" or op.name.startswith("softmax"))


def _check(model: ModelSpec, seqs) -> tuple[np.ndarray, np.ndarray]:
    if model.is_mla or not model.is_decoder_only:
        raise PerfmodelError(f"model {model.name}: the ragged step cost covers decoder-only, non-MLA models")
    if not len(seqs):
        raise PerfmodelError("ragged step: no sequences")
    new = np.asarray([int(n) for n, _ in seqs], dtype=np.int64)
    past = np.asarray([int(p) for _, p in seqs], dtype=np.int64)
    if (new < 1).any() or (past < 0).any():
        raise PerfmodelError("ragged step: every sequence needs >= 1 new token and >= 0 cached ones")
    return new, past


def body_ops(model: ModelSpec, tokens: int, precision: Precision, flash: bool, exec_mode: str,
             decode: bool = False) -> list[Op]:
    """The step's shared operators over `tokens` new tokens (all but attention and the head)."""
    ops = phase_ops(model, 1, tokens, 0, precision, flash, phase="decode" if decode else "prefill",
                    exec_mode=exec_mode)
    return [o for o in ops if o.group != "head" and not is_attention(o)]


def attention_ops(model: ModelSpec, new, past, precision: Precision, flash: bool, exec_mode: str) -> list[Op]:
    """Per-sequence attention operators (fields are arrays over the sequences)."""
    ops = phase_ops(model, 1, np.asarray(new), np.asarray(past), precision, flash, exec_mode=exec_mode,
                    phase="decode" if np.all(np.asarray(new) == 1) else "prefill")
    return [o for o in ops if is_attention(o)]


def head_ops(model: ModelSpec, sequences: int, precision: Precision, flash: bool, exec_mode: str) -> list[Op]:
    ops = phase_ops(model, sequences, 1, 0, precision, flash, exec_mode=exec_mode)
    return [o for o in ops if o.group == "head"]


def ragged_ops(model: ModelSpec, seqs, precision: Precision | None = None, flash: bool = True,
               exec_mode: str = "eager") -> list[Op]:
    """Operators of one ragged step over seqs = [(new tokens, cached tokens), ...]."""
    p = precision or Precision()
    new, past = _check(model, seqs)
    return (body_ops(model, int(new.sum()), p, flash, exec_mode, decode=bool((new == 1).all()))
            + attention_ops(model, new, past, p, flash, exec_mode) + head_ops(model, len(new), p, flash, exec_mode))


def attention_seconds(ops: list[Op], hw: HardwareSpec, precision: Precision, exec_mode: str, footprint) -> float:
    """Seconds of per-sequence attention operators: each sequence's kernels launched on their own in eager
    mode; in graph modes one kernel over all sequences (roofline times summed, no per-sequence floor).

    In eager mode the host cost is the calibrated per-sequence, per-layer cost of the ragged attention loop
    (efficiency.ragged_sequence_us) where the hardware has one: a ragged step runs, per sequence, the paged-KV
    write and gather and a one-sequence attention call, not the batched attention operator whose dispatch
    cost the operator calibration measures."""
    total = 0.0
    per_seq = hw.efficiency.ragged_sequence_us
    sequences = 0
    for op in ops:
        t = op_timing(op, hw, precision, exec_mode, footprint)
        if launches_per_op(exec_mode) and per_seq is None:
            total += float(np.sum(t.time_s)) * op.layers
        else:
            roof = np.maximum(t.compute_s, t.memory_s)
            total += float(np.sum(roof)) * op.layers
            sequences = max(sequences, int(np.size(roof)))
    if launches_per_op(exec_mode) and per_seq is not None and ops:
        total += per_seq * 1e-6 * sequences * max(op.layers for op in ops)
    return total


def ragged_step_seconds(model: ModelSpec, hw: HardwareSpec, seqs, precision: Precision | None = None,
                        flash: bool = True, exec_mode: str = "eager") -> float:
    """Seconds of one ragged step on hw (the forward only: the server's host time per step is separate)."""
    p = precision or Precision()
    new, past = _check(model, seqs)
    body = body_ops(model, int(new.sum()), p, flash, exec_mode, decode=bool((new == 1).all()))
    head = head_ops(model, len(new), p, flash, exec_mode)
    fp = weight_footprint(body + head) if hw.memory_levels else None
    t = sum(float(np.sum(x.time_s)) * x.op.layers for x in op_timings(body + head, hw, p, exec_mode))
    attn = attention_ops(model, new, past, p, flash, exec_mode)
    return t + attention_seconds(attn, hw, p, exec_mode, fp)
