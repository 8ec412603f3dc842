"""Exact count equality: the engine's FLOPs and bytes per operator, phase and step equal the cost model's."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.operators import Precision, phase_ops
from perfmodel.engine.tracer import OpRecord
from perfmodel.specs.model import ModelSpec

FIELDS = ("flops", "weight_bytes", "act_read_bytes", "kv_read_bytes", "act_write_bytes", "kv_write_bytes")


@dataclass
class Mismatch:
    phase: str
    step: int
    op: str
    field: str
    engine: int
    model: int

    def __str__(self) -> str:
        return (f"{self.phase} step {self.step} {self.op}.{self.field}: engine {self.engine:,} != model "
                f"{self.model:,} ({self.engine - self.model:+,})")


def engine_totals(records: list[OpRecord]) -> dict:
    """(phase, step) -> op name -> field -> total over layers, plus the layer count."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for r in records:
        d = out[(r.phase, r.step)][r.name]
        for f in FIELDS:
            d[f] += getattr(r, f)
        d["calls"] += 1
    return out


def op_totals(ops) -> dict:
    """op name -> field -> the operator's total over its layers (integers), plus its layer count."""
    return {o.name: {**{f: int(np.rint(np.asarray(getattr(o, f)) * o.layers)) for f in FIELDS}, "calls": o.layers}
            for o in ops}


def model_totals(spec: ModelSpec, batch: int, new: int, past: int, precision: Precision, flash: bool,
                 experts_touched=None, all_logits: bool = False, exec_mode: str = "eager") -> dict:
    return op_totals(phase_ops(spec, batch, new, past, precision, flash, experts_touched=experts_touched,
                               all_logits=all_logits, phase="prefill" if past == 0 and new > 1 else None,
                               exec_mode=exec_mode))


def compare_generation(spec: ModelSpec, records: list[OpRecord], batch: int, prompt_len: int,
                       precision: Precision, flash: bool, experts_touched: list[int] | None = None,
                       exec_mode: str = "eager") -> list[Mismatch]:
    """Every (phase, step, operator, field) of a cached generation of equal-length prompts. exec_mode: the
    engine's operator structure ("eager", or "fused" for Transformer(structure="fused"))."""
    eng = engine_totals(records)
    mism: list[Mismatch] = []
    moe_layers = spec.moe_layers
    for i, ((phase, step), ops) in enumerate(sorted(eng.items(), key=lambda kv: kv[0][1])):
        new, past = (prompt_len, 0) if phase == "prefill" else (1, prompt_len + step - 1)
        touched = None
        if moe_layers and experts_touched is not None:
            # the engine logs one count per MoE layer per step; the model takes their mean
            touched = sum(experts_touched[step * moe_layers:(step + 1) * moe_layers]) / moe_layers
        pred = model_totals(spec, batch, new, past, precision, flash, touched, exec_mode=exec_mode)
        for name in sorted(set(ops) | set(pred)):
            e, m = ops.get(name), pred.get(name)
            if e is None or m is None:
                mism.append(Mismatch(phase, step, name, "missing in " + ("engine" if e is None else "model"),
                                     0, 0))
                continue
            for f in FIELDS:
                if e[f] != m[f]:
                    mism.append(Mismatch(phase, step, name, f, e[f], m[f]))
    return mism


def compare_forwards(records: list[OpRecord], expected: dict) -> list[Mismatch]:
    """Engine records against the cost model's operators per (phase, step): expected maps (phase, step) to
    that forward's list of Ops (e.g. costmodel.speculative.verify_ops)."""
    eng = engine_totals(records)
    mism: list[Mismatch] = []
    for key in sorted(set(eng) | set(expected), key=lambda k: (k[1], k[0])):
        ops, pred = eng.get(key, {}), op_totals(expected.get(key, []))
        for name in sorted(set(ops) | set(pred)):
            e, m = ops.get(name), pred.get(name)
            if e is None or m is None:
                mism.append(Mismatch(*key, name, "missing in " + ("engine" if e is None else "model"), 0, 0))
                continue
            for f in FIELDS:
                if e[f] != m[f]:
                    mism.append(Mismatch(*key, name, f, e[f], m[f]))
    return mism
