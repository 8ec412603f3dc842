"""Execution modes: how a forward pass is launched, the one place where launch costs and fusion are decided.

- `eager`: every operator is launched from the host (PyTorch eager, transformers, the reference engine's
  per-operator loop). Each operator pays the launch overhead plus its dispatch cost (per backend, measured by
  `perfmodel calibrate`), and the forward pays its host glue (per step and per layer).
- `graph`: the step is captured once and replayed with one launch (CUDA graphs; torch.compile without
  fusion on the CPU). No per-operator host cost, but a kernel still takes at least the hardware's
  kernel_min_us, and the step pays one graph launch.
- `fused`: `graph` plus the fusions serving engines ship (perfmodel.costmodel.operators: qkv_proj,
  gate_up_proj with the activation in its epilogue, add_norm, RoPE and the KV write inside attention). This is
  the default: vLLM, SGLang and TensorRT-LLM all replay CUDA graphs for decode and ship these fused kernels.

A framework profile (perfmodel.frameworks) names its mode; `--exec` overrides it.
"""

from __future__ import annotations

from perfmodel.errors import bad_value

EXEC_MODES = ("eager", "graph", "fused")
DEFAULT_EXEC = "fused"


def check_exec_mode(mode: str) -> str:
    if mode not in EXEC_MODES:
        raise bad_value("--exec", mode, "|".join(EXEC_MODES))
    return mode


def launches_per_op(mode: str) -> bool:
    """Whether each operator is launched (and dispatched) from the host."""
    return check_exec_mode(mode) == "eager"
