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
