"""Saturation rate in closed form from the simulator's step costs (used by serve-bench where
perfmodel.planning.saturation is not present).

At saturation the queue never empties, so the batch holds as many sequences as the batch limit and the KV pool
allow: B = min(max_batch, pool tokens / (prompt + output/2)), a sequence holding on average its prompt and half
its output. A request then costs the server its prompt's share of a mixed step (the ragged step with its
prefill minus the same step without it) plus its O-1 decode tokens' share of B-sequence decode steps
(host time per step included). Capacity is the rate at which this demand is one second per second.
"""

from __future__ import annotations

import numpy as np

from perfmodel.planning.simulate import StepCosts


def saturation_rate(costs: StepCosts, input_tokens, output_tokens, max_batch: int, kv_blocks: int,
                    block_tokens: int = 16) -> dict:
    i, o = float(np.mean(input_tokens)), float(np.mean(output_tokens))
    ctx = int(i + o / 2)
    batch = max(1, min(int(max_batch), int(kv_blocks * block_tokens // (i + o / 2))))
    dec = costs.step([(1, ctx)] * batch)
    decode_s = max(o - 1, 0) * dec / batch
    prompts = np.rint(np.quantile(np.asarray(input_tokens), (np.arange(16) + 0.5) / 16)).astype(int)
    prefill_s = float(np.mean([costs.step([(int(p), 0)] + [(1, ctx)] * batch) - dec for p in prompts]))
    demand = decode_s + prefill_s
    return {"rate_rps": 1.0 / demand, "batch": batch, "decode_step_s": dec, "decode_s_per_request": decode_s,
            "prefill_s_per_request": prefill_s, "bound": "prefill" if prefill_s >= decode_s else "decode",
            "source": "perfmodel.serving.capacity"}
