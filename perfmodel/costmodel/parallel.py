"""Multi-device execution: tensor, pipeline, expert and data parallelism, with their communication costs.

Tensor parallel over p devices splits every projection, attention head and expert matrix p ways (weights,
FLOPs and KV cache divided by p) and adds two all-reduces of the hidden state per layer, costed as a ring:
2(p-1)/p * bytes / link bandwidth + latency. Pipeline parallel puts num_layers/s layers on each of s stages:
a request crosses s-1 stage boundaries (a point-to-point send of its hidden state each), and with m micro-batches
in flight a forward pass wastes the bubble (s-1)/(m+s-1). Expert parallel spreads MoE experts over e devices with
two all-to-alls per MoE layer (dispatch and combine). Data-parallel replicas multiply throughput and cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfmodel.costmodel.operators import Op, Precision
from perfmodel.errors import PerfmodelError
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec

# operators whose weights, FLOPs and activations are split by tensor parallelism (heads or matrix columns/rows)
TP_SPLIT = {"q_proj", "k_proj", "v_proj", "o_proj", "rope", "kv_write", "attention", "qk", "softmax", "av",
            "gate_proj", "up_proj", "act_mul", "act", "down_proj", "lm_head", "expert_gate", "expert_up",
            "expert_act_mul", "expert_down", "shared_gate_proj", "shared_up_proj", "shared_act_mul",
            "shared_down_proj", "q_a_proj", "q_b_proj", "kv_b_proj", "q_absorb", "out_absorb",
            # fused execution's operators (perfmodel.costmodel.operators, exec_mode "fused")
            "qkv_proj", "gate_up_proj", "up_act_proj", "expert_gate_up", "shared_gate_up_proj",
            # per-layer attention types and per-head / per-logit elementwise work
            "attention_local", "attention_chunked", "qk_norm", "logit_softcap"}


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    microbatches: int = 1

    def __post_init__(self) -> None:
        for f in ("tp", "pp", "ep", "dp", "microbatches"):
            if getattr(self, f) < 1:
                raise PerfmodelError(f"{f}: {getattr(self, f)} is not valid; allowed: an integer >= 1")

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp * (self.ep if self.ep > self.tp else 1)

    def check(self, model: ModelSpec) -> None:
        if model.num_kv_heads % self.tp and self.tp % model.num_kv_heads:
            raise PerfmodelError(f"tp: {self.tp} does not divide {model.name}'s {model.num_kv_heads} KV heads")
        if self.tp > model.num_heads:  # a device must hold at least one query head
            raise PerfmodelError(f"tp: {self.tp} exceeds {model.name}'s {model.num_heads} attention heads")
        if self.pp > model.num_layers:
            raise PerfmodelError(f"pp: {self.pp} exceeds {model.name}'s {model.num_layers} layers")
        if self.ep > 1 and not model.is_moe:
            raise PerfmodelError(f"ep: {model.name} has no experts")


def ring_allreduce_s(nbytes, p: int, hw: HardwareSpec):
    """Time of a ring all-reduce of nbytes over p devices."""
    if p <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=np.float64))
    link = _link(hw)
    return 2 * (p - 1) / p * np.asarray(nbytes, dtype=np.float64) / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6


def all_to_all_s(nbytes, p: int, hw: HardwareSpec):
    """Each device sends (p-1)/p of its nbytes to the others."""
    if p <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=np.float64))
    link = _link(hw)
    return (p - 1) / p * np.asarray(nbytes, dtype=np.float64) / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6


def _link(hw: HardwareSpec):
    if hw.interconnect is None:
        raise PerfmodelError(f"hardware {hw.name}: no interconnect; multi-device plans need one "
                             "(interconnect.bandwidth_gbps and latency_us in its YAML)")
    return hw.interconnect


def split_ops(ops: list[Op], par: Parallelism, model: ModelSpec) -> list[Op]:
    """Per-device operators: TP-split operators divided by tp; expert weights divided across ep."""
    out = []
    for op in ops:
        div = par.tp if op.name in TP_SPLIT else 1
        wdiv = div
        if op.name.startswith("expert_") and par.ep > 1:
            wdiv = max(div, par.ep)
        out.append(Op(op.name, op.kind, op.layers, op.flops / div if div > 1 else op.flops,
                      weight_bytes=op.weight_bytes / wdiv if wdiv > 1 else op.weight_bytes,
                      act_read_bytes=op.act_read_bytes / div if div > 1 else op.act_read_bytes,
                      kv_read_bytes=op.kv_read_bytes / div if div > 1 else op.kv_read_bytes,
                      act_write_bytes=op.act_write_bytes / div if div > 1 else op.act_write_bytes,
                      kv_write_bytes=op.kv_write_bytes / div if div > 1 else op.kv_write_bytes,
                      min_dim=op.min_dim, group=op.group, host_s=op.host_s, link_bytes=op.link_bytes,
                      comm_s=op.comm_s, variant=op.variant, calls=op.calls))
    return out


def comm_seconds(model: ModelSpec, par: Parallelism, hw: HardwareSpec, tokens, precision: Precision) -> dict:
    """Communication per forward pass of `tokens` tokens (per device, not overlapped with compute)."""
    a = precision.act_bytes
    hidden_bytes = np.asarray(tokens, dtype=np.float64) * model.hidden_size * a
    out = {"tp_allreduce": 2 * model.num_layers * ring_allreduce_s(hidden_bytes, par.tp, hw)}
    out["pp_send"] = (par.pp - 1) * (hidden_bytes / (_link(hw).bandwidth_gbps * 1e9) + _link(hw).latency_us * 1e-6) \
        if par.pp > 1 else np.zeros_like(hidden_bytes)
    if model.is_moe and par.ep > 1:
        routed = hidden_bytes * model.experts_per_token
        out["ep_all_to_all"] = 2 * model.moe_layers * all_to_all_s(routed, par.ep, hw)
    return out


def comm_ops(model: ModelSpec, par: Parallelism, hw: HardwareSpec, tokens, precision: Precision) -> list[Op]:
    """The collectives of one forward pass of `tokens` tokens as operators of kind "comm" (per device, on the
    critical path, not overlapped with compute): two ring all-reduces of the hidden state per layer under
    tensor parallelism, a point-to-point send per pipeline boundary, two all-to-alls per MoE layer under expert
    parallelism. link_bytes is one call's message; comm_s its time from the hardware YAML's interconnect."""
    a = precision.act_bytes
    hidden = np.asarray(tokens, dtype=np.float64) * model.hidden_size * a
    ops = []
    if par.tp > 1:
        ops.append(Op("tp_allreduce", "comm", 2 * model.num_layers, 0, group="comm", link_bytes=hidden,
                      comm_s=ring_allreduce_s(hidden, par.tp, hw)))
    if par.pp > 1:
        link = _link(hw)
        ops.append(Op("pp_send", "comm", par.pp - 1, 0, group="comm", link_bytes=hidden,
                      comm_s=hidden / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6))
    if model.is_moe and par.ep > 1:
        routed = hidden * model.experts_per_token
        ops.append(Op("ep_all_to_all", "comm", 2 * model.moe_layers, 0, group="comm", link_bytes=routed,
                      comm_s=all_to_all_s(routed, par.ep, hw)))
    return ops


def per_device_ops(ops: list[Op], model: ModelSpec, par: Parallelism, hw: HardwareSpec, tokens,
                   precision: Precision) -> list[Op]:
    """One forward's critical path on tp*pp (*ep) devices: every operator split as its device runs it, the
    layers of all pipeline stages in sequence, and the collectives as operators."""
    if par.tp * par.pp * par.ep == 1:
        return ops
    par.check(model)
    return split_ops(ops, par, model) + comm_ops(model, par, hw, tokens, precision)


def per_device_weights(model: ModelSpec, par: Parallelism, precision: Precision, total_bytes: float) -> float:
    """Weight bytes on one device: split over tp*pp, with experts spread further over ep when ep > tp."""
    from perfmodel.dtypes import bytes_per_element

    shards = par.tp * par.pp
    w = total_bytes / shards
    if model.is_moe and par.ep > par.tp:
        expert = model.moe_layers * model.num_experts * model.mlp_params(model.moe_intermediate_size)
        w -= expert * bytes_per_element(precision.weights) / shards * (1 - par.tp / par.ep)
    return w


def pipeline_bubble(par: Parallelism) -> float:
    return (par.pp - 1) / (par.microbatches + par.pp - 1)
