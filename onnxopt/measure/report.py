"""The report of an optimize run: measurements before and after, JSON, text table and HTML.

`optimize` gives the pipeline and each pass's time and changes; this module adds what the
cost model says of both models (size, params, MACs, activation memory), what
`onnxopt.measure.compare` measured (latency, fidelity per output, the gate), and writes it all as
JSON or as one self-contained HTML page whose plots (matplotlib, the `report` extra) are
embedded as PNG.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any, Callable

import onnx

from onnxopt.analysis.cost import human, model_cost
from onnxopt.errors import UsageError

# Ops whose weights are "layers" in the per-layer plots.
_LAYER_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulNBits", "DequantizeLinear",
              "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "Gather"}


def require_matplotlib() -> None:
    """UsageError (exit 2) naming the fix when matplotlib is missing (HTML reports need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("an HTML report needs matplotlib: pip install 'onnxopt[report]' "
                         "(or write a .json report)") from None


# -- measurements ------------------------------------------------------------------------------
def layer_rows(cost) -> list[dict]:
    """Per-layer weight facts for the plots: bits, sparsity and the matrix's largest rank."""
    rows = []
    for w in cost.weights:
        if w.consumer not in _LAYER_OPS or len(w.shape) < 2 or w.params < 64:
            continue
        rank = min(w.shape[0], math.prod(w.shape[1:]))
        rows.append({"name": w.name, "op": w.consumer, "shape": list(w.shape), "params": w.params,
                     "bits": round(w.bits, 3), "sparsity": round(w.sparsity, 6), "rank": rank,
                     "kind": w.kind})
    return rows


def measure(proto: onnx.ModelProto, input_shapes: dict | None = None, feeds: dict | None = None) -> dict[str, Any]:
    """What the cost model says of ``proto`` (counts are strings when dims stay symbolic).

    ``feeds``, one batch of inputs, lets the cost model observe shapes inference misses.
    """
    cost = model_cost(proto, input_shapes, feeds=feeds)
    j = cost.to_json()
    by_kind: dict[str, int] = {}
    for w in cost.weights:
        key = f"{w.kind} {w.dtype}"
        by_kind[key] = by_kind.get(key, 0) + w.bytes
    return {
        "params": j["params"], "weight_bytes": j["weight_bytes"], "macs": j["macs"], "flops": j["flops"],
        "activation_peak_bytes": j["activation_memory"]["peak_bytes"],
        "uncounted_nodes": len(j["uncounted_nodes"]),
        "weight_bytes_by_kind": by_kind, "layers": layer_rows(cost),
    }


def add_measurements(report: dict, original, optimized: onnx.ModelProto, data=None,
                     metric: str | Callable = "cosine", max_drop: float | None = None,
                     latency: bool = True, progress: bool = False, providers: list[str] | None = None,
                     input_shapes: dict | None = None) -> dict:
    """Add cost, fidelity and latency of ``original`` vs ``optimized`` to an optimize report
    (run on ``providers``, the target's resolved execution providers; default CPU).

    ``input_shapes``: the shapes the optimized model's inputs were fixed to (random inputs
    are made in those shapes). Returns the comparison (``onnxopt.measure.compare``), whose
    ``gate`` the caller enforces.
    """
    from onnxopt.measure.compare import compare
    from onnxopt.ir.model import load

    comparison = compare(original, optimized, data=data, metric=metric, max_drop=max_drop,
                         latency=latency, memory=latency, progress=progress, providers=providers,
                         input_shapes=input_shapes)
    shapes = comparison.get("input_shapes")
    before_proto = load(original).to_proto() if not isinstance(original, onnx.ModelProto) else original
    feeds = _first_batch(before_proto, data)
    report.setdefault("before", {}).update(measure(before_proto, shapes, feeds))
    report.setdefault("after", {}).update(measure(optimized, shapes, feeds))
    report["input_shapes"] = shapes
    for side, key in (("before", "reference"), ("after", "candidate")):
        for field in ("latency_ms", "session_memory_bytes"):
            if comparison[key].get(field) is not None:
                report[side][field] = comparison[key][field]
    report["fidelity"] = {k: comparison[k] for k in ("data", "batches", "outputs", "metric", "gate",
                                                     "latency_ratio", "latency_runs", "threads", "providers")
                          if k in comparison}
    return comparison


def _first_batch(proto: onnx.ModelProto, data) -> dict | None:
    """The batch compare ran first (DATA's first, or the same seeded random inputs)."""
    from onnxopt.measure.compare import _sample_batch, read_batches

    try:
        return read_batches(data, proto, max_batches=1)[0] if data is not None else _sample_batch(proto, None, 0)
    except Exception:  # noqa: BLE001  (compare already ran on it; the cost model can do without)
        return None


# -- text ----------------------------------------------------------------------------------
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(label, before, after, after/before) for every figure the report holds."""
    b, a = report.get("before", {}), report.get("after", {})
    rows = []

    def add(label, x, y, fmt: Callable[[Any], str] = lambda v: f"{v:,}" if isinstance(v, int) else str(v)):
        if x is None and y is None:
            return
        nx, ny = _num(x), _num(y)
        ratio = f"{ny / nx:.2f}x" if nx and ny is not None else "-"
        rows.append((label, fmt(x) if x is not None else "-", fmt(y) if y is not None else "-", ratio))

    add("nodes", b.get("nodes"), a.get("nodes"))
    add("params", b.get("params"), a.get("params"))
    add("file bytes", report.get("input_bytes"), report.get("output_bytes"))
    add("weight bytes", b.get("weight_bytes"), a.get("weight_bytes"))
    add("MACs", b.get("macs"), a.get("macs"), lambda v: human(v))
    add("activation mem", b.get("activation_peak_bytes"), a.get("activation_peak_bytes"),
        lambda v: human(v, "B"))
    add("latency ms", b.get("latency_ms"), a.get("latency_ms"), lambda v: f"{v:.3f}")
    add("session memory", b.get("session_memory_bytes"), a.get("session_memory_bytes"),
        lambda v: human(v, "B"))
    return rows


def fidelity_line(report: dict) -> str | None:
    fid = report.get("fidelity")
    if not fid:
        return None
    m = fid["metric"]
    worst_snr = min((s["snr_db"] for s in fid["outputs"].values() if "snr_db" in s), default=None)
    text = f"fidelity ({fid['data']}): {m['metric']} {m['value']:.6g} (drop {m['drop']:.3g})"
    if worst_snr is not None:
        text += f", worst SNR {worst_snr:.1f} dB"
    if "gate" in fid:
        text += f"; gate max drop {fid['gate']['max_drop']:g}: {'passed' if fid['gate']['passed'] else 'FAILED'}"
    return text


def search_lines(search: dict) -> list[str]:
    """The search's outcome as text: budget, evaluations, the Pareto front, the choice."""
    lines = [f"search: {search['evaluations']} candidate(s) on {search['executor']} in {search['seconds']:.1f} s "
             f"(sensitivity {search.get('sensitivity_seconds', 0):.1f} s); budget {search['metric']} drop <= "
             f"{search['max_drop']:g}; Pareto front of {len(search['front'])}:"]
    lines.append(f"  {'size':>7} {'latency':>8} {'drop':>10}  pipeline (after the lossless prefix)")
    for c in search["front"]:
        mark = "*" if c is search.get("chosen") or c.get("id") == search.get("chosen", {}).get("id") else " "
        lines.append(f"{mark} {c['size_ratio']:>6.3f}x {c['latency_ratio']:>7.3f}x {c['drop']:>10.4g}  "
                     f"{short_pipeline(c['pipeline'], search.get('base_pipeline', ''))}")
    return lines


def short_pipeline(text: str, base: str) -> str:
    """A candidate's pipeline from where it departs from the base's lossless prefix."""
    from onnxopt.pipeline.text import parse

    try:
        mine, theirs = parse(text), parse(base)
    except Exception:  # noqa: BLE001
        return text
    i = 0
    while i < min(len(mine), len(theirs)) and mine[i].name == theirs[i].name and mine[i].options == theirs[i].options:
        i += 1
    from onnxopt.pipeline.text import format_pipeline

    return ("…," if i else "") + format_pipeline(mine[i:])


# -- files ---------------------------------------------------------------------------------
def to_json(report: dict) -> str:
    def default(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        return str(x)

    return json.dumps(_finite(report), indent=2, default=default) + "\n"


def _finite(x):
    """JSON has no inf/nan: write them as strings ("inf" for an exact match's SNR)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def render(report: dict, path: str) -> str:
    """The report as text for ``path``: JSON for .json, a self-contained page for .html."""
    if path.lower().endswith((".html", ".htm")):
        return to_html(report)
    return to_json(report)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    before = {r["name"]: r for r in report.get("before", {}).get("layers", [])}
    after = report.get("after", {}).get("layers", [])
    if after or before:
        rows = after or list(before.values())
        fig, axes = plt.subplots(3, 1, figsize=(max(6, min(24, 0.25 * len(rows) + 4)), 8), sharex=True)
        x = list(range(len(rows)))
        for ax, key, label in zip(axes, ("sparsity", "bits", "rank"),
                                  ("sparsity (zero fraction)", "bits per weight", "max rank")):
            ax.bar(x, [r[key] for r in rows], color="tab:blue", label="after")
            prior = [before[r["name"]][key] if r["name"] in before else math.nan for r in rows]
            ax.plot(x, prior, "o", color="tab:orange", markersize=3, label="before")
            ax.set_ylabel(label)
        axes[0].legend(loc="upper right")
        if len(rows) <= 60:
            axes[-1].set_xticks(x)
            axes[-1].set_xticklabels([r["name"][-28:] for r in rows], rotation=90, fontsize=6)
        axes[-1].set_xlabel("layer (weight tensor)")
        fig.suptitle("Per-layer sparsity, bits and rank")
        out.append(("Per-layer sparsity, bits and rank", _png(fig)))
    kinds_b = report.get("before", {}).get("weight_bytes_by_kind", {})
    kinds_a = report.get("after", {}).get("weight_bytes_by_kind", {})
    if kinds_b or kinds_a:
        keys = sorted(set(kinds_b) | set(kinds_a))
        fig, ax = plt.subplots(figsize=(7, 2.5))
        for i, (label, kinds) in enumerate((("before", kinds_b), ("after", kinds_a))):
            left = 0.0
            for j, k in enumerate(keys):
                v = kinds.get(k, 0) / 1e6
                ax.barh(i, v, left=left, color=f"C{j}", label=k if i == 0 else None)
                left += v
        ax.set_yticks([0, 1])
        ax.set_yticklabels(["before", "after"])
        ax.set_xlabel("weight MB")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("Size breakdown by weight kind and type")
        out.append(("Size breakdown", _png(fig)))
    search = report.get("search")
    if search:
        out.extend(_search_plots(plt, search))
    fid = report.get("fidelity")
    if fid and fid.get("outputs"):
        names = [n for n, s in fid["outputs"].items() if "snr_db" in s]
        if names:
            snr = [min(fid["outputs"][n]["snr_db"], 200.0) for n in names]
            fig, ax = plt.subplots(figsize=(7, max(1.5, 0.4 * len(names) + 1)))
            ax.barh(range(len(names)), snr, color="tab:green")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels([n[-40:] for n in names], fontsize=7)
            for i, n in enumerate(names):
                ax.text(snr[i], i, f" cos {fid['outputs'][n]['cosine']:.5f}", va="center", fontsize=7)
            ax.set_xlabel("SNR dB (capped at 200; inf = identical)")
            ax.set_title("Fidelity per output")
            out.append(("Fidelity per output", _png(fig)))
    return out


def _search_plots(plt, search: dict) -> list[tuple[str, str]]:
    """Per-layer sensitivity bars, and the candidates' size against latency with the front."""
    out = []
    for sens in search.get("sensitivity", []):
        rows = sens["layers"]
        if not rows:
            continue
        snr = [min(float(r["snr_db"]) if not isinstance(r["snr_db"], str) else
                   (200.0 if r["snr_db"] == "inf" else 0.0), 200.0) for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, min(24, 0.22 * len(rows) + 3)), 3.5))
        ax.bar(range(len(rows)), snr, color="tab:red")
        ax.set_ylabel("SNR dB, only this layer compressed")
        if len(rows) <= 60:
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([r["layer"][-28:] for r in rows], rotation=90, fontsize=6)
        title = f"Sensitivity: {sens['pass']} one layer at a time (most sensitive first)"
        ax.set_title(title)
        out.append((title, _png(fig)))
    done = [c for c in search.get("candidates", []) if "error" not in c]
    if done:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        budget = search["max_drop"]
        inside = [c for c in done if c["drop"] <= budget]
        outside = [c for c in done if c["drop"] > budget]
        if outside:
            ax.scatter([c["size_ratio"] for c in outside], [c["latency_ratio"] for c in outside], marker="x",
                       color="0.6", label="over budget")
        if inside:
            sc = ax.scatter([c["size_ratio"] for c in inside], [c["latency_ratio"] for c in inside],
                            c=[c["drop"] for c in inside], cmap="viridis", label="within budget")
            fig.colorbar(sc, ax=ax, label=f"{search['metric']} drop")
        front = sorted(search.get("front", []), key=lambda c: c["size_ratio"])
        ax.plot([c["size_ratio"] for c in front], [c["latency_ratio"] for c in front], "o--", color="tab:red",
                mfc="none", markersize=10, label="Pareto front")
        chosen = search.get("chosen")
        if chosen:
            ax.plot([chosen["size_ratio"]], [chosen["latency_ratio"]], "*", color="tab:red", markersize=16,
                    label="written")
        ax.set_xlabel("size (x original)")
        ax.set_ylabel("latency (x original)")
        ax.legend(fontsize=7)
        ax.set_title("Search: size, latency and metric drop of every candidate")
        out.append(("Search: Pareto front", _png(fig)))
    return out


def to_html(report: dict) -> str:
    require_matplotlib()
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>onnxopt report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
             "font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>onnxopt report: {esc(str(report.get('source') or ''))}</h1>",
             f"<p>target <b>{esc(str(report.get('target')))}</b>; pipeline "
             f"<code>{esc(str(report.get('pipeline')))}</code>; {report.get('seconds', 0):.2f} s; "
             f"onnxopt {esc(str(report.get('onnxopt_version')))}</p>"]
    if report.get("input_shapes"):
        parts.append(f"<p>measured with input shapes {esc(json.dumps(report['input_shapes']))}</p>")
    parts.append("<h2>Before and after</h2><table><tr><th></th><th>before</th><th>after</th><th>ratio</th></tr>")
    for row in summary_rows(report):
        parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    line = fidelity_line(report)
    if line:
        parts.append(f"<p>{esc(line)}</p>")
    parts.append("<h2>Passes</h2><table><tr><th>pass</th><th>status</th><th>seconds</th>"
                 "<th>nodes</th><th>params</th><th>stats</th></tr>")
    for p in report.get("passes", []):
        stats = ", ".join(f"{k}={v}" for k, v in (p.get("stats") or {}).items())
        if p.get("error"):
            stats = f"{p['error']}; {stats}"
        parts.append(f"<tr><td>{esc(p['name'])}</td><td>{esc(p['status'])}</td><td>{p['seconds']:.3f}</td>"
                     f"<td>{p['nodes_before']} → {p['nodes_after']}</td>"
                     f"<td>{p['params_before']:,} → {p['params_after']:,}</td>"
                     f"<td style='text-align:left'>{esc(stats)}</td></tr>")
    parts.append("</table>")
    for note in report.get("notes", []):
        parts.append(f"<p>note: {esc(note)}</p>")
    for title, png in _plots(report):
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{png}'>")
    fid = report.get("fidelity")
    if fid:
        parts.append("<h2>Fidelity per output</h2><table><tr><th>output</th><th>cosine</th><th>SNR dB</th>"
                     "<th>max abs</th><th>mean abs</th><th>top1</th></tr>")
        for name, s in fid["outputs"].items():
            if "cosine" in s:
                parts.append(f"<tr><td>{esc(name)}</td><td>{s['cosine']:.6f}</td><td>{s['snr_db']:.1f}</td>"
                             f"<td>{s['max_abs']:.3g}</td><td>{s['mean_abs']:.3g}</td>"
                             f"<td>{s['top1']:.4f}</td></tr>" if "top1" in s else
                             f"<tr><td>{esc(name)}</td><td>{s['cosine']:.6f}</td><td>{s['snr_db']:.1f}</td>"
                             f"<td>{s['max_abs']:.3g}</td><td>{s['mean_abs']:.3g}</td><td>-</td></tr>")
        parts.append("</table>")
    search = report.get("search")
    if search:
        parts.append("<h2>Search: Pareto front</h2><p>" + "<br>".join(esc(line) for line in search_lines(search)[:1])
                     + "</p><table><tr><th>pipeline (after the lossless prefix)</th><th>size</th><th>latency</th>"
                     "<th>drop</th></tr>")
        for c in search["front"]:
            parts.append(f"<tr><td>{esc(short_pipeline(c['pipeline'], search.get('base_pipeline', '')))}</td>"
                         f"<td>{c['size_ratio']:.3f}x</td><td>{c['latency_ratio']:.3f}x</td>"
                         f"<td>{c['drop']:.4g}</td></tr>")
        parts.append("</table>")
    # The whole report, for tools that read the page.
    data = to_json(report).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='onnxopt-report'>{data}</script></body></html>")
    return "\n".join(parts)
