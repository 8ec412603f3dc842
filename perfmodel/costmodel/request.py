"""Request-level results: prefill, every decode step, memory, and what follows (TTFT, TPOT, throughput)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from perfmodel.costmodel.execution import DEFAULT_EXEC, check_exec_mode
from perfmodel.costmodel.parallel import Parallelism, per_device_ops, per_device_weights
from perfmodel.costmodel.operators import (Precision, kv_bytes_per_token_layer, kv_cache_bytes, phase_ops,
                                           weight_memory_bytes)
from perfmodel.costmodel.roofline import OpTiming, op_timings, phase_summary
from perfmodel.errors import PerfmodelError
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    input_tokens: int = 512
    output_tokens: int = 128

    def __post_init__(self) -> None:
        for f, lo in (("batch", 1), ("input_tokens", 1), ("output_tokens", 1)):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise PerfmodelError(f"{f.replace('_tokens', '')}: {v!r} is not valid; allowed: an integer >= {lo}")

    @property
    def decode_steps(self) -> int:
        """The first output token comes from prefill; each further one takes a decode step."""
        return self.output_tokens - 1

    @property
    def decode_past(self) -> np.ndarray:
        """Cached tokens before each decode step: the prompt plus the output tokens so far, minus the new one."""
        return self.input_tokens + np.arange(self.decode_steps)


@dataclass
class Analysis:
    model: ModelSpec
    hardware: HardwareSpec
    workload: Workload
    precision: Precision
    flash: bool
    prefill: list[OpTiming]
    decode: list[OpTiming]  # arrays over decode steps
    kv_method: object = None  # a KVMethod compressing the cache, or None (dense)
    exec_mode: str = DEFAULT_EXEC
    parallelism: Parallelism = field(default_factory=Parallelism)

    def _phase(self, timings: list[OpTiming]) -> dict:
        s = phase_summary(timings)
        total = lambda x: float(np.sum(x))  # noqa: E731  decode arrays run over steps
        cb, mb = total(s["compute_bound_s"]), total(s["memory_bound_s"])
        return {"flops": int(np.sum(s["flops"])), "bytes": int(np.sum(s["bytes"])), "time_s": total(s["time_s"]),
                "bound": "compute" if cb >= mb else "memory", "compute_bound_s": cb, "memory_bound_s": mb}

    @property
    def prefill_summary(self) -> dict:
        return self._phase(self.prefill)

    @property
    def decode_summary(self) -> dict:
        if not self.workload.decode_steps:
            return {"flops": 0, "bytes": 0, "time_s": 0.0, "bound": "none", "compute_bound_s": 0.0,
                    "memory_bound_s": 0.0}
        return self._phase(self.decode)

    def decode_step_times(self) -> np.ndarray:
        if not self.workload.decode_steps:
            return np.zeros(0)
        return np.asarray(phase_summary(self.decode)["time_s"], dtype=np.float64).reshape(-1)

    @property
    def request(self) -> dict:
        """TTFT, TPOT and throughput; every step (prefill, each decode) also pays the serving loop's host time
        outside the forward pass (hardware.host_overhead_us, set by a framework profile or calibration)."""
        w = self.workload
        host = self.hardware.host_overhead_us * 1e-6
        ttft = self.prefill_summary["time_s"] + host
        steps = self.decode_step_times() + host
        decode_s = float(steps.sum())
        e2e = ttft + decode_s
        tpot = decode_s / len(steps) if len(steps) else 0.0
        if self.model.architecture == "encoder":  # throughput in input tokens encoded per second
            return {"ttft_s": ttft, "tpot_s": 0.0, "tpot_first_s": 0.0, "tpot_last_s": 0.0, "e2e_s": ttft,
                    "tokens_per_s": w.batch * w.input_tokens / ttft, "decode_tokens_per_s": 0.0}
        return {"ttft_s": ttft, "tpot_s": tpot,
                "tpot_first_s": float(steps[0]) if len(steps) else 0.0,
                "tpot_last_s": float(steps[-1]) if len(steps) else 0.0,
                "e2e_s": e2e, "tokens_per_s": w.batch * w.output_tokens / e2e,
                "decode_tokens_per_s": w.batch / tpot if tpot else 0.0, "host_overhead_per_step_s": host}

    @property
    def memory(self) -> dict:
        m, w, p = self.model, self.workload, self.precision
        weights = weight_memory_bytes(m, p)
        if m.architecture == "encoder":
            kv = 0
        elif m.architecture == "encoder-decoder":  # self-attention over outputs + cross K/V over the input
            kv = int(kv_cache_bytes(m, w.output_tokens, w.batch, p.kv_cache)
                     + kv_cache_bytes(m, w.input_tokens, w.batch, p.kv_cache))
        elif self.kv_method is not None and self.kv_method.kind != "dense":
            from perfmodel.costmodel.kv_compression import kv_stored_bytes

            kv = int(kv_stored_bytes(m, self.kv_method, w.input_tokens + w.output_tokens, w.batch, p.kv_cache))
        else:
            kv = int(kv_cache_bytes(m, w.input_tokens + w.output_tokens, w.batch, p.kv_cache))
        act = activation_peak_bytes(self.prefill)  # the per-device operators' working sets already
        par = self.parallelism
        weights, kv = per_device_weights(m, par, p, weights), kv / (par.tp * par.pp)
        total = weights + kv + act
        cap = self.hardware.memory_capacity
        return {"weights_bytes": int(weights), "kv_cache_bytes": int(kv),
                "kv_bytes_per_token": m.num_layers * kv_bytes_per_token_layer(m, p.kv_cache) // (par.tp * par.pp),
                "activation_bytes": int(act), "total_bytes": int(total), "capacity_bytes": int(cap),
                "fits": bool(total <= cap), "devices": par.devices, "per_device": par.devices > 1}

    def op_rows(self) -> list[dict]:
        """LLM-Viewer style per-operator table: per phase, each operator's totals over its layers (and steps)."""
        rows = []
        for phase, timings in (("prefill", self.prefill), ("decode", self.decode)):
            if phase == "decode" and not self.workload.decode_steps:
                continue
            steps = self.workload.decode_steps if phase == "decode" else 1
            # decode operators whose cost does not depend on context are scalars: count them once per step
            total = lambda x: np.sum(np.broadcast_to(x, (steps,)))  # noqa: E731
            for t in timings:
                n = t.op.layers
                comp, mem = float(total(t.compute_s)) * n, float(total(t.memory_s)) * n
                flops, nbytes = int(total(t.op.flops)) * n, int(total(t.op.bytes)) * n
                rows.append({
                    "phase": phase, "op": t.op.name, "kind": t.op.kind, "layers": n, "flops": flops,
                    "bytes": nbytes, "weight_bytes": int(total(t.op.weight_bytes)) * n,
                    "kv_bytes": int(total(t.op.kv_read_bytes) + total(t.op.kv_write_bytes)) * n,
                    "arithmetic_intensity": flops / max(nbytes, 1),
                    "time_s": float(total(t.time_s)) * n, "bound": (str(np.asarray(t.bound).reshape(-1)[0]) if t.op.kind in ("host", "comm")
                              else "compute" if comp >= mem else "memory"),
                })
        return rows

    def to_dict(self) -> dict:
        return {"model": self.model.name, "hardware": self.hardware.name,
                "workload": {"batch": self.workload.batch, "input": self.workload.input_tokens,
                             "output": self.workload.output_tokens},
                "precision": {"weights": self.precision.weights, "activations": self.precision.activations,
                              "kv_cache": self.precision.kv_cache, "compute": self.precision.compute_dtype},
                "flash_attention": self.flash, "exec_mode": self.exec_mode,
                "parallelism": {"tp": self.parallelism.tp, "pp": self.parallelism.pp, "ep": self.parallelism.ep,
                                "devices": self.parallelism.devices},
                "kv_method": self.kv_method.label if self.kv_method is not None else "dense",
                "prefill": self.prefill_summary, "decode": self.decode_summary, "request": self.request,
                "memory": self.memory, "ops": self.op_rows()}


def activation_peak_bytes(timings: list[OpTiming]) -> int:
    """The largest working set of activations one operator holds at once (its inputs and outputs)."""
    return int(max(np.max(np.asarray(t.op.act_read_bytes + t.op.act_write_bytes)) for t in timings))


def encoder_ops(model: ModelSpec, batch, tokens, precision: Precision, flash: bool, exec_mode: str = "eager"):
    """One bidirectional pass over `tokens` (BERT, or a T5 encoder stack): no KV cache, no LM head."""
    layers = model.num_encoder_layers if model.architecture == "encoder-decoder" else model.num_layers
    enc = model.replace(architecture="decoder", num_layers=layers)
    ops = phase_ops(enc, batch, tokens, 0, precision, flash, phase="prefill", causal=False, head=False, cache=False,
                    exec_mode=exec_mode)
    if model.architecture == "encoder-decoder":
        for o in ops:
            o.name = f"encoder.{o.name}"
    return ops


def analyze(model: ModelSpec, hardware: HardwareSpec, workload: Workload, precision: Precision | None = None,
            flash: bool = True, kv_method=None, exec_mode: str = DEFAULT_EXEC,
            parallelism: Parallelism | None = None) -> Analysis:
    """Prefill (encoder pass, or encoder + first decoder step), then every decode step, as exec_mode runs them.
    With parallelism (tensor / pipeline / expert), every operator is what one device runs, the collectives are
    operators of their own, the times are the critical path through all pipeline stages, and the memory is
    per device."""
    p = precision or Precision()
    x = check_exec_mode(exec_mode)
    par = parallelism or Parallelism()
    if par.tp * par.pp * par.ep > 1 and not model.is_decoder_only:
        raise PerfmodelError(f"--tp/--pp/--ep: parallel analysis covers decoder-only models, not {model.name} "
                             f"({model.architecture})")

    def timed(ops, tokens=None):
        if tokens is not None:
            ops = per_device_ops(ops, model, par, hardware, tokens, p)
        return op_timings(ops, hardware, p, x)

    if kv_method is not None and kv_method.kind != "dense":
        if not model.is_decoder_only or model.is_mla:
            raise PerfmodelError(f"--kv-prune: applies to decoder-only models with K/V heads, not {model.name}")
        w = workload
        past = w.decode_past if w.decode_steps else np.asarray([w.input_tokens])
        prefill = timed(phase_ops(model, w.batch, w.input_tokens, 0, p, flash, phase="prefill", kv_method=kv_method,
                                  exec_mode=x), w.batch * w.input_tokens)
        decode = timed(phase_ops(model, w.batch, 1, past, p, flash, phase="decode", kv_method=kv_method,
                                 exec_mode=x), w.batch)
        return Analysis(model, hardware, w, p, flash, prefill, decode, kv_method, x, par)
    w = workload
    past = w.decode_past if w.decode_steps else np.asarray([w.input_tokens])
    if model.architecture == "encoder":
        if w.output_tokens != 1:
            raise PerfmodelError(f"output: model {model.name} is encoder-only and generates nothing; allowed: 1")
        prefill = timed(encoder_ops(model, w.batch, w.input_tokens, p, flash, x))
        return Analysis(model, hardware, w, p, flash, prefill, [], exec_mode=x)
    if model.architecture == "encoder-decoder":
        # the decoder starts from one start token; its self-attention cache holds generated tokens only
        first = phase_ops(model, w.batch, 1, 0, p, flash, phase="prefill", cross_tokens=w.input_tokens, exec_mode=x)
        prefill = timed(encoder_ops(model, w.batch, w.input_tokens, p, flash, x) + first)
        steps = np.arange(1, w.decode_steps + 1) if w.decode_steps else np.asarray([1])
        decode = timed(phase_ops(model, w.batch, 1, steps, p, flash, phase="decode", cross_tokens=w.input_tokens,
                                 exec_mode=x))
        return Analysis(model, hardware, w, p, flash, prefill, decode, exec_mode=x)
    prefill = timed(phase_ops(model, w.batch, w.input_tokens, 0, p, flash, phase="prefill", exec_mode=x),
                    w.batch * w.input_tokens)
    decode = timed(phase_ops(model, w.batch, 1, past, p, flash, phase="decode", exec_mode=x), w.batch)
    return Analysis(model, hardware, w, p, flash, prefill, decode, exec_mode=x, parallelism=par)
