"""The cache-aware (hierarchical) roofline: which memory level an operator's bytes come from.

An operator's bytes come from the smallest level that holds them at the reuse distance that matters:
- weights and the KV cache are read once per forward pass, so between two reads of the same weight the whole
  forward's weights stream past: their level is the one that holds the forward's weight footprint (a decode
  step of a real model streams from DRAM/HBM even though one layer would fit in the last-level cache);
- activations are written by one operator and read by the next, so their level is the one that holds the
  operator's own activation working set (what it reads and writes).
Levels come from the hardware YAML (memory.levels: capacity and the all-threads read bandwidth, measured by
`perfmodel calibrate` on a CPU); main memory is the hardware's own bandwidth. Without levels, every byte comes
from main memory, the classic roofline.
"""

from __future__ import annotations

import numpy as np

from perfmodel.costmodel.operators import Op
from perfmodel.specs.hardware import HardwareSpec


def weight_footprint(ops: list[Op]):
    """Bytes of weights one forward pass streams (each operator's weights times the layers it runs in)."""
    return sum(np.asarray(o.weight_bytes, dtype=np.float64) * o.layers for o in ops if o.kind != "host")


def level_bandwidth(hw: HardwareSpec, working_set) -> np.ndarray:
    """Bytes/s of the smallest level whose capacity holds working_set (main memory if none does)."""
    ws = np.asarray(working_set, dtype=np.float64)
    bw = np.full(ws.shape, hw.memory_bandwidth)
    for level in reversed(hw.memory_levels):  # largest first, so the smallest level that fits wins
        bw = np.where(ws <= level.capacity_bytes, level.bandwidth, bw)
    return bw


def level_name(hw: HardwareSpec, working_set: float) -> str:
    for level in hw.memory_levels:
        if working_set <= level.capacity_bytes:
            return level.name
    return hw.memory_type or "DRAM"


def memory_seconds(op: Op, hw: HardwareSpec, efficiency, footprint=None) -> np.ndarray:
    """Seconds to move op's bytes at `efficiency` of each level's bandwidth: weights and KV reads from the
    level holding the forward's weight footprint, activations (and KV writes) from the level holding the
    operator's activation working set."""
    stream = np.asarray(op.weight_bytes + op.kv_read_bytes, dtype=np.float64)
    local = np.asarray(op.act_read_bytes + op.act_write_bytes + op.kv_write_bytes, dtype=np.float64)
    if not hw.memory_levels:
        return (stream + local) / (hw.memory_bandwidth * efficiency)
    far = hw.memory_bandwidth if footprint is None else level_bandwidth(hw, footprint)
    near = level_bandwidth(hw, op.act_read_bytes + op.act_write_bytes)
    return (stream / far + local / near) / efficiency
