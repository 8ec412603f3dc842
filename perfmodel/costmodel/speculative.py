"""Speculative decoding: a draft model proposes gamma tokens, the target verifies them in one pass.

With per-token acceptance rate alpha, a target step yields (1 - alpha^(gamma+1)) / (1 - alpha) tokens on
average (Leviathan et al. 2023). A step costs gamma draft decode steps plus one target forward over gamma+1
tokens, both from the cost model at the same context.

`verify_ops`, `draft_ops` are a step's forwards operator by operator, the way the reference engine runs them
(perfmodel.engine.speculative): the verification is the target's forward over the last emitted token and the
drafts with logits at every position, then a rollback of the cache to the accepted prefix (a length reset: no
FLOPs, no bytes); a draft forward has 1 new token, or 2 after a step that accepted every draft.
"""

from __future__ import annotations

from perfmodel.costmodel.execution import DEFAULT_EXEC
from perfmodel.costmodel.operators import Op, Precision, phase_ops
from perfmodel.costmodel.roofline import op_timings, phase_summary
from perfmodel.errors import PerfmodelError
from perfmodel.specs.hardware import HardwareSpec
from perfmodel.specs.model import ModelSpec


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    if not 0 <= alpha <= 1:
        raise PerfmodelError(f"--alpha: {alpha} is not valid; allowed: 0 <= alpha <= 1")
    if gamma < 1:
        raise PerfmodelError(f"--gamma: {gamma} is not valid; allowed: an integer >= 1")
    if alpha == 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def rollback_op() -> Op:
    """The KV cache's rollback to the accepted prefix: its length is reset, nothing is moved."""
    return Op("kv_rollback", "memory", 1, 0, group="head")


def verify_ops(target: ModelSpec, proposed: int, past: int, precision: Precision | None = None, flash: bool = True,
               exec_mode: str = DEFAULT_EXEC, batch: int = 1) -> list[Op]:
    """The target's verification of `proposed` drafts after `past` cached tokens: proposed+1 new tokens, logits
    (and sampling) at each, then the rollback."""
    return phase_ops(target, batch, proposed + 1, past, precision, flash, all_logits=True,
                     phase="decode" if proposed == 0 else "prefill", exec_mode=exec_mode) + [rollback_op()]


def draft_ops(draft: ModelSpec, new: int, past: int, precision: Precision | None = None, flash: bool = True,
              exec_mode: str = DEFAULT_EXEC, rollback: bool = False, batch: int = 1, sample: bool = True) -> list[Op]:
    """One draft forward of `new` tokens (1, or 2 after a full acceptance); the step's last one rolls back.
    sample=False: a forward that only fills the cache (the draft's prefill)."""
    ops = phase_ops(draft, batch, new, past, precision, flash, phase="decode" if new == 1 else "prefill",
                    include_sampling=sample, exec_mode=exec_mode)
    return ops + [rollback_op()] if rollback else ops


def _forward_s(model, hw, batch, new, past, p, exec_mode=DEFAULT_EXEC):
    ops = phase_ops(model, batch, new, past, p, phase="decode" if new == 1 else "prefill", exec_mode=exec_mode)
    return float(phase_summary(op_timings(ops, hw, p, exec_mode))["time_s"])


def speculative(target: ModelSpec, draft: ModelSpec, hw: HardwareSpec, alpha: float, gamma: int,
                context: int = 1024, batch: int = 1, precision: Precision | None = None,
                exec_mode: str = DEFAULT_EXEC) -> dict:
    p = precision or Precision()
    tokens = expected_tokens_per_step(alpha, gamma)
    t_target = _forward_s(target, hw, batch, 1, context - 1, p, exec_mode)
    t_draft = _forward_s(draft, hw, batch, 1, context - 1, p, exec_mode)
    t_verify = _forward_s(target, hw, batch, gamma + 1, context - 1, p, exec_mode)
    step = gamma * t_draft + t_verify
    return {"target": target.name, "draft": draft.name, "alpha": alpha, "gamma": gamma, "context": context,
            "batch": batch, "tokens_per_target_step": tokens, "target_decode_step_s": t_target,
            "draft_step_s": t_draft, "verify_step_s": t_verify, "speculative_step_s": step,
            "tpot_s": step / tokens, "baseline_tpot_s": t_target, "speedup": t_target * tokens / step}
