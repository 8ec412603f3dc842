"""Commands that run the reference engine: generate (with a step-by-step trace of prefill and decode)."""

from __future__ import annotations

import typer

from perfmodel.cli.app import app
from perfmodel.errors import PerfmodelError
from perfmodel.output import check_format, console, emit, seconds, si


@app.command()
def generate(
    model: str = typer.Option("smollm2-135m", help="smollm2-135m (real weights), a .gguf, a safetensors folder, "
                                                    "or a library name (random weights)"),
    prompt: str = typer.Option("The capital of France is", help="prompt text (token ids with --ids for "
                                                                   "random-weight models)"),
    max_new_tokens: int = typer.Option(32, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 is greedy"),
    top_k: int = typer.Option(0, help="0 is off"),
    top_p: float = typer.Option(1.0, help="1 is off"),
    seed: int = typer.Option(0),
    backend: str = typer.Option("numpy", help="numpy | torch"),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 (torch)"),
    layers: int = typer.Option(None, help="run only the first N layers"),
    flash: bool = typer.Option(False, "--flash/--no-flash", help="FlashAttention kernel (torch backend)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute every token each step (no KV cache)"),
    trace: bool = typer.Option(False, "--trace", help="print prefill and every decode step as they run"),
    speculative: str = typer.Option(None, "--speculative",
                                    help="ngram (prompt lookup) | int8 (the model with int8 weights as draft): "
                                         "speculative decoding, timed against plain decoding of the same prompt"),
    gamma: int = typer.Option(4, "--gamma", help="draft tokens per target step (--speculative)"),
    hardware: str = typer.Option(None, help="calibrated hardware for --speculative's predicted speed-up "
                                            "(default: the newest hardware/local-*.yaml)"),
    format: str = typer.Option("table", "--format", help="table | json | csv"),
) -> None:
    """Generate text with the reference engine; --trace shows the KV cache growing token by token."""
    from perfmodel.costmodel.operators import kv_cache_bytes
    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.generate import generate as run_generate
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.sampling import SamplingParams
    from perfmodel.engine.tracer import Tracer
    from perfmodel.engine.transformer import Transformer

    check_format(format)
    if max_new_tokens < 1:
        raise PerfmodelError(f"--max-new-tokens: {max_new_tokens} is not valid; allowed: an integer >= 1")
    params = SamplingParams(temperature, top_k, top_p, seed)
    be = make_backend(backend, dtype)
    spec, weights, tok = load_engine_model(model, layers, seed)
    if tok is None:
        try:
            ids = [int(x) % spec.vocab_size for x in prompt.split()]
        except ValueError:
            raise PerfmodelError(f"--prompt: model {model} has random weights and no tokenizer; give token ids "
                                 "separated by spaces, e.g. '1 2 3'") from None
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise PerfmodelError("--prompt: empty prompt")
    if speculative is not None:
        return _speculative(spec, weights, tok, be, ids, max_new_tokens, params, speculative, gamma, flash,
                            no_cache, hardware, format, prompt)
    engine = Transformer(spec, weights, be, flash=flash, tracer=Tracer(enabled=True))
    kv_dtype = be.dtype_name
    text = (lambda t: tok.decode([t])) if tok else str
    c = console()
    show_trace = trace and format == "table"
    if show_trace:
        c.print(f"[bold]{spec.name}[/bold] on {backend}/{dtype}, {spec.num_layers} layers, "
                f"KV cache {'on' if not no_cache else 'off (recompute)'}; "
                f"formula: 2·{spec.num_layers}·{spec.num_kv_heads}·{spec.head_dim}·tokens·{be.nbytes(be.zeros((1,)))} B")

    def on_step(st):
        if not show_trace:
            return
        formula = int(kv_cache_bytes(spec, st.cache_tokens, 1, kv_dtype))
        check = "✓" if no_cache or st.cache_bytes == formula else f"≠ {formula}"
        if st.phase == "prefill":
            c.print(f"prefill  {st.new_tokens:>4} tokens  {seconds(st.time_s):>10}  cache {st.cache_tokens:>5} tokens "
                    f"= {st.cache_bytes:>12,} B {check}  → {text(st.tokens[0])!r}")
        else:
            c.print(f"decode {st.step:>4}  {text(st.tokens[0])!r:<14} {seconds(st.time_s):>10}  "
                    f"cache {st.cache_tokens:>5} tokens = {st.cache_bytes:>12,} B {check}")

    gen = run_generate(engine, [ids], max_new_tokens, params, tok.eos_id if tok else None, not no_cache, on_step)
    n = int(gen.lengths[0])
    out_ids = gen.tokens[0, :n].tolist()
    pre = [s for s in gen.steps if s.phase == "prefill"]
    dec = [s for s in gen.steps if s.phase == "decode"]
    result = {"model": spec.name, "backend": backend, "dtype": dtype, "prompt_tokens": len(ids),
              "generated_tokens": n, "text": tok.decode(out_ids) if tok else " ".join(map(str, out_ids)),
              "token_ids": out_ids, "prefill_s": pre[0].time_s,
              "decode_ms_per_token": 1e3 * sum(s.time_s for s in dec) / max(len(dec), 1),
              "kv_cache_bytes": gen.steps[-1].cache_bytes, "peak_traced_bytes": gen.peak_bytes,
              "steps": [vars(s) for s in gen.steps]}
    if emit(format, result, result["steps"]):
        return
    c.print(f"[bold]{prompt}[/bold]{result['text']}" if tok else result["text"])
    c.print(f"prefill {len(ids)} tokens in {seconds(result['prefill_s'])}; decode "
            f"{result['decode_ms_per_token']:.2f} ms/token over {len(dec)} steps; KV cache "
            f"{si(result['kv_cache_bytes'], 'B', 1024)}")


def _speculative(spec, weights, tok, be, ids, max_new_tokens, params, drafter, gamma, flash, no_cache, hardware,
                 format, prompt) -> None:
    """generate --speculative: plain decoding then speculative decoding of the same prompt, in this process."""
    from perfmodel.costmodel.operators import Precision
    from perfmodel.engine.speculative import DRAFTERS, ModelDrafter, NgramDrafter, NoDrafter, speculative_generate
    from perfmodel.engine.transformer import Transformer
    from perfmodel.errors import bad_value
    from perfmodel.validation.speculative import predict, step_costs

    if drafter not in DRAFTERS:
        raise bad_value("--speculative", drafter, "|".join(DRAFTERS))
    if gamma < 1:
        raise PerfmodelError(f"--gamma: {gamma} is not valid; allowed: an integer >= 1")
    if no_cache:
        raise PerfmodelError("--no-cache: speculative decoding verifies against the KV cache; drop --no-cache")
    from perfmodel.cli.validation_commands import _newest_local
    from perfmodel.specs import load_hardware

    try:
        hw = load_hardware(hardware) if hardware else _newest_local()
    except PerfmodelError:
        if hardware:
            raise
        hw = None  # no calibrated machine: measured figures only
    target = Transformer(spec, weights, be, flash=flash)
    eos = tok.eos_id if tok else None
    # plain decoding timed by the same loop (one token per target step); a warm-up run first keeps BLAS thread
    # start-up and page faults out of the timing
    speculative_generate(target, NoDrafter(), ids, 3, 1, params, eos)
    plain = speculative_generate(target, NoDrafter(), ids, max_new_tokens, 1, params, eos)
    if drafter == "int8":
        from perfmodel.engine.quantised import int8_model

        draft = int8_model(spec, weights)
        d = ModelDrafter(draft, len(ids) + max_new_tokens + gamma + 2)
    else:
        draft, d = None, NgramDrafter(3)
    g = speculative_generate(target, d, ids, max_new_tokens, gamma, params, eos)
    n = len(g.tokens)
    plain_ms = 1e3 * plain.decode_s / max(len(plain.tokens) - 1, 1)
    spec_ms = 1e3 * g.decode_s / max(n - 1, 1)
    text = tok.decode(g.tokens) if tok else " ".join(map(str, g.tokens))
    result = {"model": spec.name, "drafter": drafter, "gamma": gamma, "prompt_tokens": len(ids),
              "generated_tokens": n, "text": text, "token_ids": g.tokens,
              "same_as_plain": g.tokens == plain.tokens,
              "acceptance_rate": g.acceptance_rate, "tokens_per_target_step": g.tokens_per_step,
              "target_steps": len(g.steps), "plain_decode_ms_per_token": plain_ms,
              "speculative_decode_ms_per_token": spec_ms, "measured_speedup": plain_ms / spec_ms if spec_ms else None,
              "predicted_speedup": None, "hardware": hw.name if hw else None}
    if hw is not None:
        costs = step_costs(spec, draft.spec if draft else None, hw, len(ids) + n // 2, gamma,
                           target_engine=be.name, target_precision=Precision(be.dtype_name, be.dtype_name,
                                                                             be.dtype_name), flash_target=flash)
        result.update(predict(g.acceptance_rate, [s.proposed for s in g.steps], costs))
    if emit(format, result, [{k: v for k, v in result.items() if k != "token_ids"}]):
        return
    c = console()
    c.print(f"[bold]{prompt}[/bold]{text}" if tok else text)
    pred = f", predicted {result['predicted_speedup']:.2f}× on {hw.name}" if hw else ""
    c.print(f"{drafter} draft, γ={gamma}: α {g.acceptance_rate:.2f}, {g.tokens_per_step:.2f} tokens per target step; "
            f"decode {spec_ms:.1f} ms/token vs {plain_ms:.1f} plain: {plain_ms / spec_ms:.2f}× measured{pred}"
            + ("" if result["same_as_plain"] or params.temperature else " [red](differs from plain greedy)[/red]"))
