"""The roofline: an operator takes max(compute time, memory time) at the hardware's achievable roofs, plus overhead."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.execution import launches_per_op
from perfmodel.costmodel.hierarchy import memory_seconds, weight_footprint
from perfmodel.costmodel.operators import Op, Precision
from perfmodel.specs.hardware import HardwareSpec


@dataclass
class OpTiming:
    op: Op
    compute_s: object
    memory_s: object
    overhead_s: float
    floor_s: float = 0.0  # the shortest a kernel can take when it is replayed from a graph (no launch cost)

    @property
    def time_s(self):
        return np.maximum(np.maximum(self.compute_s, self.memory_s), self.floor_s) + self.overhead_s

    @property
    def bound(self):
        if self.op.kind in ("host", "comm"):
            return np.asarray("host" if self.op.kind == "host" else "interconnect")
        bound = np.where(self.compute_s >= self.memory_s, "compute", "memory")
        return np.where(np.maximum(self.compute_s, self.memory_s) < self.floor_s, "latency", bound)

    @property
    def arithmetic_intensity(self):
        return np.asarray(self.op.flops) / np.maximum(np.asarray(self.op.bytes), 1)


def compute_roof(hw: HardwareSpec, kind: str, precision: Precision) -> float:
    """Peak FLOP/s an operator kind can use: tensor units for matmuls and attention, vector units otherwise."""
    if kind == "matmul":  # weight GEMMs: natively at fp8/fp4 where resolved so, else the activation dtype
        return hw.peak_flops(precision.compute_dtype)
    if kind == "attention":  # QK^T and attention*V multiply activations
        return hw.peak_flops(precision.activations)
    return hw.vector_tflops * 1e12


SKINNY_ROWS = 16  # matmuls of 2..16 rows (decode batches, short prompts) stream packed weights


def _matmul_group(rows) -> np.ndarray:
    rows = np.asarray(rows)
    return np.where(rows == 1, "gemv", np.where(rows <= SKINNY_ROWS, "skinny", "matmul"))


def efficiency_group(op: Op):
    """The operator's efficiency group: its kind, except that weight matmuls split by their row count. One row
    (decode at batch 1) is a "gemv": BLAS runs a matrix-vector product that streams the weights once. From two
    rows on it packs the weights into panels first (on a CPU about a second pass over them); up to SKINNY_ROWS
    rows ("skinny": decode batches, short prompts) that packing and the weight stream are the whole cost, while
    larger ones ("matmul") amortise it over enough rows to run near the compute roof."""
    if op.kind == "matmul" and op.min_dim is not None:
        return _matmul_group(op.min_dim)
    return np.asarray(op.kind)


def skinny_row_factor(table: dict, rows) -> np.ndarray:
    """A skinny matmul's weight-stream slow-down at `rows` rows (Efficiency.skinny_rows; 1 outside 2..16 or
    without a table), interpolated between the measured row counts."""
    rows = np.asarray(rows, dtype=np.float64)
    if not table:
        return np.ones(rows.shape)
    ms = np.array(sorted(int(k) for k in table), dtype=np.float64)
    fs = np.array([table[k] for k in sorted(table, key=int)], dtype=np.float64)
    return np.where(_matmul_group(rows) == "skinny", np.interp(rows, ms, fs), 1.0)


def _kind_multiplier(table: dict, op: Op):
    base = table.get(op.kind, 1.0)
    if op.kind == "matmul" and op.min_dim is not None and ("gemv" in table or "skinny" in table):
        group = _matmul_group(op.min_dim)
        return np.where(group == "gemv", table.get("gemv", base),
                        np.where(group == "skinny", table.get("skinny", base), base))
    return base


def _overhead_scale(scale: dict, op: Op):
    """The fitted multiplier on an operator's per-call cost: by operator (and variant), else by group; a weight
    matmul's is looked up within its row group ("gemv.q_proj"), since one operator behaves differently there."""
    key = f"{op.name}:{op.variant}" if op.variant else op.name
    if op.kind == "matmul" and op.min_dim is not None:
        group = _matmul_group(op.min_dim)
        by_group = {g: scale.get(f"{g}.{key}", scale.get(f"{g}.{op.name}", scale.get(g, scale.get("matmul", 1.0))))
                    for g in ("gemv", "skinny", "matmul")}
        return np.where(group == "gemv", by_group["gemv"],
                        np.where(group == "skinny", by_group["skinny"], by_group["matmul"]))
    return scale[key] if key in scale else scale.get(op.name, _kind_multiplier(scale, op))


def op_timing(op: Op, hw: HardwareSpec, precision: Precision, exec_mode: str = "eager",
              footprint=None) -> OpTiming:
    """footprint: the forward pass's weight bytes (the reuse distance of weights and KV reads; None: they
    come from main memory)."""
    eff = hw.efficiency
    if op.kind == "host":
        return OpTiming(op, np.zeros(()), np.zeros(()), float(op.host_s))
    if op.kind == "comm":  # the link's time: bandwidth and latency from the hardware YAML (costmodel.parallel)
        return OpTiming(op, np.zeros(()), np.asarray(op.comm_s, dtype=np.float64), 0.0)
    c_eff = eff.compute * _kind_multiplier(eff.kind_compute, op)
    if op.kind in ("matmul", "attention") and eff.matmul_half_dim and op.min_dim is not None:
        d = np.asarray(op.min_dim, dtype=np.float64)
        c_eff = c_eff * d / (d + eff.matmul_half_dim)
    m_eff = eff.memory
    if op.kind in ("elementwise", "memory") and eff.elementwise_memory:
        m_eff = eff.elementwise_memory
    m_eff = m_eff * _kind_multiplier(eff.kind_memory, op)
    if op.kind == "matmul" and eff.matmul_half_bytes:
        b = np.asarray(op.bytes, dtype=np.float64)
        m_eff = m_eff * b / (b + eff.matmul_half_bytes)
    compute_s = np.asarray(op.flops, dtype=np.float64) / (compute_roof(hw, op.kind, precision) * c_eff)
    memory_s = memory_seconds(op, hw, m_eff, footprint)
    if op.kind == "matmul" and eff.skinny_rows and op.min_dim is not None:
        # the measured table is the skinny group's whole law over its rows (packing and the weight stream):
        # its time is the stream times the table, and compute is held only to the bare peak (the half-dim
        # penalty, fitted on square matmuls, does not describe BLAS's 2..16-row kernels)
        skinny = _matmul_group(op.min_dim) == "skinny"
        memory_s = memory_s * skinny_row_factor(eff.skinny_rows, op.min_dim)
        compute_s = np.where(skinny, np.asarray(op.flops, dtype=np.float64) / compute_roof(hw, op.kind, precision),
                             compute_s)
    if not launches_per_op(exec_mode):  # replayed from a graph: no host cost per operator, a minimum duration
        return OpTiming(op, compute_s, memory_s, 0.0, hw.kernel_min_us * 1e-6)
    per_call = eff.op_overhead_map_us.get(f"{op.name}:{op.variant}") if op.variant else None
    if per_call is None:
        per_call = eff.op_overhead_map_us.get(op.name, eff.kind_overhead_us.get(op.kind, eff.op_overhead_us))
    if eff.kind_overhead_scale:
        per_call = per_call * _overhead_scale(eff.kind_overhead_scale, op)
    # an operator made of several kernel calls (the blocked attention's matrix products) dispatches each
    overhead = (hw.launch_overhead_us + per_call * np.asarray(op.calls, dtype=np.float64)) * 1e-6
    return OpTiming(op, compute_s, memory_s, overhead)


def host_op(ops: list[Op], hw: HardwareSpec, exec_mode: str) -> Op:
    """The forward pass's host cost outside its operators, as a pseudo-operator of kind "host" (no FLOPs, no
    bytes; host_s seconds): the glue between operators (per step and per layer: efficiency.step_overhead_us,
    layer_overhead_us), plus in graph and fused modes the graph launch."""
    eff = hw.efficiency
    layers = max((o.layers for o in ops if o.group == "layer"), default=0)
    us = eff.step_overhead_us + layers * eff.layer_overhead_us
    name = "host_glue"
    if not launches_per_op(exec_mode):
        us += hw.launch_overhead_us if hw.graph_launch_us is None else hw.graph_launch_us
        name = "graph_launch"
    return Op(name, "host", 1, 0, group="host", host_s=us * 1e-6)


def op_timings(ops: list[Op], hw: HardwareSpec, precision: Precision, exec_mode: str = "eager",
               host: bool = True) -> list[OpTiming]:
    """Every operator's timing (bytes from the memory level their reuse distance reaches), plus (host=True)
    the forward's host pseudo-operator."""
    footprint = weight_footprint(ops) if hw.memory_levels else None
    out = [op_timing(op, hw, precision, exec_mode, footprint) for op in ops]
    if host:
        out.append(op_timing(host_op(ops, hw, exec_mode), hw, precision, exec_mode))
    return out


def phase_summary(timings: list[OpTiming]) -> dict:
    """Totals over all operators, each counted once per layer it runs in."""
    flops = sum(np.asarray(t.op.flops) * t.op.layers for t in timings)
    nbytes = sum(np.asarray(t.op.bytes) * t.op.layers for t in timings)
    time_s = sum(t.time_s * t.op.layers for t in timings)
    compute_s = sum(np.maximum(t.compute_s, 0) * t.op.layers * (t.compute_s >= t.memory_s) for t in timings)
    memory_s = sum(t.memory_s * t.op.layers * (t.compute_s < t.memory_s) for t in timings)
    bound = np.where(compute_s >= memory_s, "compute", "memory")
    return {"flops": flops, "bytes": nbytes, "time_s": time_s, "bound": bound,
            "compute_bound_s": compute_s, "memory_bound_s": memory_s}
