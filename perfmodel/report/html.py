"""Assemble the self-contained HTML report (PNG figures base64-embedded, also saved beside it)."""

from __future__ import annotations

import base64
import html
import io
import shutil
import tempfile
from pathlib import Path


from perfmodel.output import seconds, si

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{margin-bottom:.2em}.sub{color:#666}table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}.kpi{display:flex;gap:1.5em;flex-wrap:wrap}
.kpi div{background:#f6f8fa;border-radius:6px;padding:.6em 1em}.kpi b{display:block;font-size:1.3em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.memory{color:#7a5}.compute{color:#a55}"""


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return buf.getvalue()


def build_report(a, plan_result: dict | None, out_dir: Path, title: str) -> Path:
    """Write <out_dir>/report.html and its PNGs through a temp folder, then move them in place."""
    from perfmodel.report import figures

    figs = {"roofline": figures.roofline(a, f"{a.model.name} on {a.hardware.name}: operators on the roofline"),
            "memory": figures.memory(a), "latency": figures.latency(a)}
    pngs = {k: _png(f) for k, f in figs.items()}
    d = a.to_dict()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        for k, b in pngs.items():
            (tmp / f"{k}.png").write_bytes(b)
        (tmp / "report.html").write_text(_html(d, pngs, plan_result, title, kv_compression_rows(a)))
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            f.replace(out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "report.html"


def _img(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode()
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}" data-file="{name}.png">'


def kv_compression_rows(a) -> list[dict]:
    """Each compression method at this workload: KV bytes, last-step TPOT and the largest batch that fits."""
    from perfmodel.costmodel.kv_compression import kv_stored_bytes
    from perfmodel.costmodel.request import Workload, analyze
    from perfmodel.kvcache.methods import KVMethod

    m, w, hw, p = a.model, a.workload, a.hardware, a.precision
    if not m.is_decoder_only or m.is_mla:
        return []
    rows = []
    tokens = w.input_tokens + w.output_tokens
    for name in ("dense", "per-token:0.5", "per-token:0.7", "per-token:0.9", "kivi:4", "kivi:2", "h2o:0.7",
                 "streaming:0.7"):
        method = KVMethod.parse(name)
        r = analyze(m, hw, Workload(w.batch, w.input_tokens, w.output_tokens), p, a.flash,
                    None if name == "dense" else method, exec_mode=a.exec_mode)
        per_seq = float(kv_stored_bytes(m, method, tokens, 1, p.kv_cache))
        free = hw.memory_capacity - r.memory["weights_bytes"] - r.memory["activation_bytes"]
        rows.append({"method": name, "kv_bytes": r.memory["kv_cache_bytes"], "fraction": per_seq / float(
            kv_stored_bytes(m, KVMethod(), tokens, 1, p.kv_cache)), "tpot_last_s": r.request["tpot_last_s"],
            "max_batch": int(max(free, 0) // per_seq)})
    return rows


def _kv_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>Not applicable to this model.</p>"
    body = "".join(f"<tr><td>{r['method']}</td><td>{si(r['kv_bytes'], 'B')}</td><td>{r['fraction'] * 100:.1f} %</td>"
                   f"<td>{seconds(r['tpot_last_s'])}</td><td>{r['max_batch']}</td></tr>" for r in rows)
    return ("<p>Compressed caches from the cost model (bitmap-pruned, KIVI, H2O, StreamingLLM; newest 32 tokens "
            "dense; metadata counted). Quality on real weights: <code>perfmodel kv-quality</code>.</p>"
            "<table><tr><th>method</th><th>KV cache</th><th>of dense</th><th>last TPOT</th><th>max batch</th></tr>"
            + body + "</table>")


def _html(d: dict, pngs: dict, plan_result: dict | None, title: str, kv_rows: list[dict]) -> str:
    q, m, w = d["request"], d["memory"], d["workload"]
    kpis = [("TTFT", seconds(q["ttft_s"])), ("TPOT", f"{seconds(q['tpot_first_s'])} → {seconds(q['tpot_last_s'])}"),
            ("end-to-end", seconds(q["e2e_s"])), ("throughput", f"{q['tokens_per_s']:,.0f} tok/s"),
            ("memory", f"{si(m['total_bytes'], 'B')} / {si(m['capacity_bytes'], 'B')}"),
            ("prefill", f"{d['prefill']['bound']}-bound"), ("decode", f"{d['decode']['bound']}-bound")]
    rows = "".join(
        f"<tr><td>{r['phase']}</td><td>{html.escape(r['op'])}</td><td>{r['layers']}</td><td>{si(r['flops'])}</td>"
        f"<td>{si(r['bytes'], 'B')}</td><td>{si(r['kv_bytes'], 'B')}</td><td>{r['arithmetic_intensity']:.1f}</td>"
        f"<td>{seconds(r['time_s'])}</td><td class=\"{r['bound']}\">{r['bound']}</td></tr>" for r in d["ops"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='sub'>batch {w['batch']}, input {w['input']}, output "
             f"{w['output']} tokens; weights {d['precision']['weights']}, activations {d['precision']['activations']},"
             f" KV {d['precision']['kv_cache']}; FlashAttention {'on' if d['flash_attention'] else 'off'}</p>",
             "<div class='kpi'>" + "".join(f"<div>{k}<b>{v}</b></div>" for k, v in kpis) + "</div>",
             "<h2>Roofline</h2><p>Each operator (summed over layers; decode over all steps) at its arithmetic intensity "
             "and attained throughput. Points on the sloped roof are memory-bound, on the flat roofs compute-bound."
             "</p>", _img("roofline", pngs["roofline"], "roofline"),
             "<h2>Memory</h2>", _img("memory", pngs["memory"], "memory"),
             "<h2>Latency and throughput</h2>", _img("latency", pngs["latency"], "latency"),
             "<h2>Plan</h2>", _plan_html(plan_result),
             "<h2>KV-cache compression</h2>", _kv_html(kv_rows),
             "<h2>Per-operator table</h2><table><tr><th>phase</th><th>operator</th><th>×</th><th>FLOPs</th>"
             "<th>bytes</th><th>KV bytes</th><th>FLOP/B</th><th>time</th><th>bound</th></tr>" + rows + "</table>",
             "<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.dataset.figures=im.length;"
             "document.body.dataset.loaded=im.filter(i=>i.complete&&i.naturalWidth>0).length;});</script>",
             "</body></html>"]
    return "\n".join(parts)


def _plan_html(p: dict | None) -> str:
    if not p:
        return "<p>No plan requested.</p>"
    if not p.get("feasible"):
        return f"<p><b>Nothing fits</b>: {html.escape(p.get('reason', ''))}</p>"
    b = p["best"]
    cost = b["cost_per_million_output_tokens_usd"]
    slo = p["slo"]
    band = p["band"]
    lines = [f"<p>For TTFT ≤ {slo['ttft_s']} s and TPOT ≤ {slo['tpot_s']} s at p{slo['percentile']:g}"
             f"{'' if not p['workload']['rate'] else ', ' + str(p['workload']['rate']) + ' requests/s'}: "
             f"<b>{b['gpus']} GPUs</b> ({b['replicas']} × TP{b['tp']}·PP{b['pp']}), batch {b['batch']}, "
             f"{b['per_gpu_output_tokens_per_s']:,.0f} output tokens/s per GPU"
             + (f", ${cost:,.2f} per million output tokens" if cost else "") + ".</p>",
             f"<p>Binding constraint: {html.escape(b['binding'])}.</p>"]
    for k in ("optimistic", "pessimistic"):
        o = band.get(k) or {}
        if o.get("gpus"):
            lines.append(f"<p>{k}: {o['gpus']} GPUs, batch {o['batch']}, {o['per_gpu_output_tokens_per_s']:,.0f} "
                         "tokens/s per GPU.</p>")
    return "".join(lines)


__all__ = ["build_report"]
