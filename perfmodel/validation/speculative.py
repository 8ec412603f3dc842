"""Speculative decoding measured in the engine against the cost model's prediction.

One process runs plain greedy decoding and speculative decoding of the same prompt (SmolLM2-135M, NumPy fp32
target) and measures α, tokens per target step and the decode speed-up. The prediction prices every forward
with the cost model on this machine's calibrated hardware (the target on its numpy engine profile, the int8
draft on its torch profile) and takes the tokens per step from the measured α: a step that verified k drafts
yields (1 - α^(k+1))/(1 - α) tokens on average. The steps' k are the drafter's own (prompt lookup proposes
fewer than γ tokens, or none, when the context has no match), not a result of verification.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from perfmodel.costmodel.operators import Precision
from perfmodel.costmodel.roofline import op_timings
from perfmodel.costmodel.speculative import draft_ops, expected_tokens_per_step, verify_ops
from perfmodel.specs.hardware import HardwareSpec

GAMMAS = tuple(range(1, 9))
ALPHA_TABLE = Path(__file__).resolve().parents[1] / "data" / "speculative_alpha.json"
TARGET_PRECISION = Precision("fp32", "fp32", "fp32")
INT8_PRECISION = Precision("int8_channel", "bf16", "bf16")


def prompts() -> dict[str, str]:
    """Real text: a pydoc topic's prose to continue, and a summarisation-like prompt whose answer repeats its
    input (the case prompt lookup is made for)."""
    from pydoc_data.topics import topics

    prose = topics["for"][:1200]
    body = topics["assert"][:900].split("\n\n", 2)[2][:700]  # past the title lines
    return {"prose": prose,
            "summarise": f"<|im_start|>user\nSummarise the following text. Quote its sentences.\n\n{body}<|im_end|>\n"
                         "<|im_start|>assistant\n"}


def forward_s(spec, hw: HardwareSpec, ops, precision: Precision, exec_mode: str = "eager") -> float:
    """Seconds of one forward's operators (and its host glue) on hw."""
    return float(sum(float(t.time_s) * (t.op.layers if t.op.kind != "host" else 1)
                     for t in op_timings(ops, hw, precision, exec_mode)))


@dataclass
class StepCosts:
    """The cost model's seconds per forward at one context, on the engine profiles that run them."""
    decode_s: float  # plain decoding: one target token
    verify_s: dict  # k drafts -> the verification forward
    draft_s: float  # one draft token (0: prompt lookup)
    catchup_s: float  # extra of a 2-token draft forward (after a full acceptance)


def step_costs(target, draft, hw: HardwareSpec, context: int, gamma: int, flash_draft: bool = True,
               target_engine: str = "numpy", target_precision: Precision = TARGET_PRECISION,
               flash_target: bool = False) -> StepCosts:
    hw_t = hw.for_engine(target_engine)
    p = target_precision
    dec = forward_s(target, hw_t, draft_ops(target, 1, context - 1, p, flash_target, "eager"), p)
    ver = {k: forward_s(target, hw_t, verify_ops(target, k, context - 1, p, flash_target, "eager"), p)
           for k in range(gamma + 1)}
    if draft is None:
        return StepCosts(dec, ver, 0.0, 0.0)
    hw_d, q = hw.for_engine("torch"), INT8_PRECISION
    d1 = forward_s(draft, hw_d, draft_ops(draft, 1, context - 1, q, flash_draft, "eager"), q)
    d2 = forward_s(draft, hw_d, draft_ops(draft, 2, context - 2, q, flash_draft, "eager"), q)
    return StepCosts(dec, ver, d1, d2 - d1)


def predict(alpha: float, proposed: list[int], costs: StepCosts) -> dict:
    """Predicted tokens per step and speed-up for steps that verified `proposed` drafts each, at measured α."""
    tokens = sum(expected_tokens_per_step(alpha, k) if k else 1.0 for k in proposed)
    full = sum(alpha ** k for k in proposed if k)  # expected full acceptances: the next draft forward has 2 tokens
    spec_s = sum(k * costs.draft_s + costs.verify_s[k] for k in proposed) + full * costs.catchup_s
    return {"predicted_tokens_per_step": tokens / max(len(proposed), 1),
            "predicted_speedup": costs.decode_s * tokens / spec_s if spec_s else float("nan"),
            "predicted_decode_ms": 1e3 * costs.decode_s, "predicted_spec_ms_per_token": 1e3 * spec_s / tokens,
            "predicted_draft_ms": 1e3 * costs.draft_s,
            "predicted_verify_ms": 1e3 * sum(costs.verify_s[k] for k in proposed) / max(len(proposed), 1)}


def measure(target, tok, draft_model, hw: HardwareSpec | None, gammas=GAMMAS, max_new_tokens: int = 48,
            drafters=("ngram", "int8"), which=None, repeats: int = 1, progress=None) -> list[dict]:
    """Rows per (prompt, drafter, γ): measured α, tokens per step, speed-up over plain decoding in this process,
    and (with hw) the prediction."""
    from perfmodel.engine.sampling import SamplingParams
    from perfmodel.engine.speculative import ModelDrafter, NgramDrafter, NoDrafter, speculative_generate

    greedy = SamplingParams()
    rows = []
    for name, text in prompts().items():
        if which and name not in which:
            continue
        ids = tok.encode(text)

        def plain() -> tuple[float, list[int]]:
            g = speculative_generate(target, NoDrafter(), ids, max_new_tokens, 1, greedy)
            return g.decode_s / (len(g.tokens) - 1), g.tokens

        _, plain_tokens = plain()  # warms caches and BLAS
        for drafter in drafters:
            for gamma in gammas:
                if progress:
                    progress(f"{name} {drafter} γ={gamma}")
                # Plain and speculative runs alternate in pairs and the speed-up is the median of the pairs'
                # ratios: on a shared VM the machine's speed drifts by a third within minutes, so a baseline
                # measured once per prompt (the earlier method) put that drift into every ratio.
                runs, plain_runs, ratios = [], [], []
                for i in range(repeats):
                    d = NgramDrafter(3) if drafter == "ngram" else ModelDrafter(
                        draft_model, len(ids) + max_new_tokens + gamma + 2)
                    if i % 2:
                        sg = speculative_generate(target, d, ids, max_new_tokens, gamma, greedy)
                        p_s, _ = plain()
                    else:
                        p_s, _ = plain()
                        sg = speculative_generate(target, d, ids, max_new_tokens, gamma, greedy)
                    runs.append(sg)
                    plain_runs.append(p_s)
                    ratios.append(p_s / (sg.decode_s / (len(sg.tokens) - 1)))
                sg = runs[-1]
                plain_s = statistics.median(plain_runs)
                spec_s = statistics.median(r.decode_s for r in runs) / (len(sg.tokens) - 1)
                row = {"prompt": name, "drafter": drafter, "gamma": gamma, "prompt_tokens": len(ids),
                       "generated_tokens": len(sg.tokens), "acceptance_rate": sg.acceptance_rate,
                       "tokens_per_target_step": sg.tokens_per_step,
                       "draft_ms": 1e3 * statistics.median(sum(s.draft_s for s in r.steps) / len(r.steps)
                                                           for r in runs),
                       "verify_ms": 1e3 * statistics.median(sum(s.verify_s for s in r.steps) / len(r.steps)
                                                            for r in runs),
                       "plain_decode_ms": 1e3 * plain_s, "spec_ms_per_token": 1e3 * spec_s,
                       "measured_speedup": statistics.median(ratios),
                       "speedup_spread_pct": 100 * (max(ratios) - min(ratios)) / statistics.median(ratios),
                       "same_tokens": sg.tokens == plain_tokens}
                if hw is not None:
                    costs = step_costs(target.spec, draft_model.spec if drafter == "int8" else None, hw,
                                       len(ids) + max_new_tokens // 2, gamma, getattr(draft_model, "flash", True))
                    row.update(predict(sg.acceptance_rate, [s.proposed for s in sg.steps], costs))
                    row["error_pct"] = 100 * (row["predicted_speedup"] / row["measured_speedup"] - 1)
                rows.append(row)
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (prompt, drafter): the γ with the highest measured speed-up."""
    best: dict = {}
    for r in rows:
        k = (r["prompt"], r["drafter"])
        if k not in best or r["measured_speedup"] > best[k]["measured_speedup"]:
            best[k] = r
    return list(best.values())


def alpha_table(rows: list[dict]) -> dict:
    """(prompt, drafter) -> {γ: α}: what `perfmodel speculative` reads its α from."""
    out: dict = {}
    for r in rows:
        out.setdefault(f"{r['prompt']}/{r['drafter']}", {})[r["gamma"]] = r["acceptance_rate"]
    return out



def write_alpha_table(rows: list[dict], path: Path | None, hardware: str) -> Path:
    path = Path(path) if path else ALPHA_TABLE
    doc = {"model": "smollm2-135m", "decoding": "greedy", "hardware": hardware,
           "alpha": {k: {str(g): round(a, 4) for g, a in v.items()} for k, v in alpha_table(rows).items()},
           "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_alpha_table(path: Path | None = None) -> dict:
    """'prompt/drafter' -> {γ: α} from the measured table."""
    from perfmodel.errors import PerfmodelError

    path = Path(path) if path else ALPHA_TABLE
    try:
        doc = json.loads(path.read_text())
        return {k: {int(g): float(a) for g, a in v.items()} for k, v in doc["alpha"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        raise PerfmodelError(f"--table: {path} is not a measured α table; write one with "
                             "`perfmodel speculative --measure`") from None
