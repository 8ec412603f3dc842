"""kv-quality: KV-cache compression methods on real SmolLM2 weights, quality against the dense cache."""

from __future__ import annotations

from pathlib import Path

import typer

from perfmodel.cli.app import app
from perfmodel.cli.options import names
from perfmodel.errors import PerfmodelError
from perfmodel.output import atomic_write, check_format, console, emit, print_table


@app.command("kv-quality")
def kv_quality(
    methods: str = typer.Option(None, help="comma-separated methods (default: per-token/per-channel × magnitude/"
                                           "output × 0.3/0.5/0.7/0.9, kivi:4, kivi:2, h2o and streaming × the same)"),
    context: int = typer.Option(512, help="prefilled context tokens"),
    steps: int = typer.Option(64, help="tokens then teacher-forced through the cache"),
    segments: int = typer.Option(1, help="text segments averaged"),
    window: int = typer.Option(32, help="newest tokens kept dense"),
    out: Path = typer.Option(Path("reports/kv-quality"), help="folder for the CSV and plot"),
    format: str = typer.Option("table", "--format", help="table | json | csv"),
) -> None:
    """Perplexity change, KL divergence, top-1 agreement and attention error of compressed KV caches against the
    dense cache, with each cache's measured size, on SmolLM2-135M and the Python docs' English text."""
    import pandas as pd
    from rich.progress import Progress

    from perfmodel.engine.backend import make_backend
    from perfmodel.engine.loading import load_engine_model
    from perfmodel.engine.transformer import Transformer
    from perfmodel.kvcache.methods import KVMethod
    from perfmodel.kvcache.quality import DEFAULT_METHODS, evaluate

    check_format(format)
    chosen = names("--methods", methods, "kv-prune methods separated by commas") if methods is not None \
        else DEFAULT_METHODS
    for mth in chosen:
        KVMethod.parse(mth, window, field="--methods")
    if context < window + 64 or steps < 1 or segments < 1:
        raise PerfmodelError(f"--context: must be at least window + 64 = {window + 64}; --steps, --segments >= 1")
    spec, weights, tok = load_engine_model("smollm2-135m")
    model = Transformer(spec, weights, make_backend("numpy"))
    with Progress(transient=True, disable=format != "table") as prog:
        task = prog.add_task("kv-quality", total=(len(chosen) + 1) * segments)
        rows = evaluate(model, tok, chosen, context, steps, segments, window=window,
                        progress=lambda name: prog.update(task, advance=1, description=f"kv-quality {name}"))
    df = pd.DataFrame(rows)
    atomic_write(out / "kv_quality.csv", lambda p: df.to_csv(p, index=False))
    _plot(df, out / "kv_quality.png", context, steps)
    if emit(format, {"context": context, "steps": steps, "rows": rows}, rows):
        return
    pct = lambda v: f"{v:+.1f} %"  # noqa: E731
    print_table(rows, title=f"SmolLM2-135M, {context}-token context + {steps} forced tokens of pydoc text "
                            f"(fp32; dense window {window})", columns={
        "method": ("method", str), "perplexity": ("PPL", lambda v: f"{v:.2f}"), "perplexity_change_pct": ("ΔPPL", pct),
        "kl_divergence": ("KL", lambda v: f"{v:.4f}"), "top1_agreement": ("top-1", lambda v: f"{v * 100:.1f} %"),
        "attention_rel_error": ("attn err", lambda v: f"{v:.3f}"),
        "kv_fraction_of_dense": ("KV / dense", lambda v: f"{v * 100:.1f} %")})
    exact = all(r["kv_bytes"] == r["model_kv_bytes"] for r in rows)
    console().print(("[green]measured KV bytes equal the cost model's formula for every method[/green]" if exact
                     else "[red]measured KV bytes differ from the cost model[/red]") + f"; {out}/kv_quality.png")


def _plot(df, path: Path, context: int, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for family, marker in (("per-token", "o"), ("per-channel", "s"), ("h2o", "^"), ("streaming", "v"),
                           ("kivi", "D")):
        for score in ("", ":output"):
            sel = df[df.method.str.startswith(family) & (df.method.str.endswith("output") == (score == ":output"))]
            if sel.empty:
                continue
            label = family + (" (output-aware)" if score else "")
            axes[0].plot(sel.kv_fraction_of_dense * 100, sel.kl_divergence, marker=marker,
                         label=label, ls="-" if family != "kivi" else "none")
            axes[1].plot(sel.kv_fraction_of_dense * 100, sel.top1_agreement * 100, marker=marker, label=label,
                         ls="-" if family != "kivi" else "none")
    axes[0].set(yscale="log", xlabel="KV cache size (% of dense, measured)",
                ylabel="KL(dense ‖ compressed) per token (nats)", title="quality vs compression")
    axes[1].set(xlabel="KV cache size (% of dense, measured)", ylabel="top-1 agreement with dense (%)",
                title="next-token agreement")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M: {context}-token context, {steps} teacher-forced tokens")
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
