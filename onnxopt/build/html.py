"""The self-contained HTML report a reviewer opens: tables and inline SVG, no network."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from onnxopt.build.job import JobResult
from onnxopt.build.summary import HEADERS, figures, ratio, summary_rows
from onnxopt.build.svg import Bar, bar_chart
from onnxopt.report import _bytes, _num, _pct

STYLE = """
body{font-family:sans-serif;margin:2em;color:#222;max-width:1250px}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f0f3f8}.text{text-align:left;
min-width:16em;max-width:30em}.built,.cached,.kept{color:#1a7f37}.error,.crashed,.gate-missed,
.gate-failed,.rolled-back{color:#c62828;font-weight:bold}section{border-top:2px solid #dde;
margin-top:1.5em}code{background:#f4f4f4;padding:1px 4px}.note{color:#555;font-size:13px}
"""

#: Per-pass charts: pass name (before any options) -> function from its stats to SVG.
CHARTS: dict[str, Any] = {}


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document around ``body`` (no script, no external resource)."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1>{''.join(body)}</body></html>\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
          status_column: int | None = None, text_columns: Sequence[int] = ()) -> str:
    """An HTML table of text cells (escaped); the status column gets a CSS class, text
    columns are aligned left (numbers right)."""
    out = ["<table><tr>" + "".join(
        f'<th{" class=text" if i in text_columns else ""}>{escape(h)}</th>'
        for i, h in enumerate(headers)) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = f' class="{_css(cell)}"' if i == status_column else \
                ' class="text"' if i in text_columns else ""
            cells.append(f"<td{cls}>{escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def build_page(results: Sequence[JobResult], title: str, executor: str,
               base: str | None = None) -> str:
    """The build report: the summary table, then one section per entry.

    Paths under ``base`` (the recipe's folder) are shown relative to it.
    """
    body = [f'<p class="note">{len(results)} models, run {escape(executor)}.</p>',
            table(HEADERS, summary_rows(list(results)), status_column=1, text_columns=(2,))]
    body += [entry_section(r, base) for r in results]
    return page(title, body)


def entry_section(result: JobResult, base: str | None = None) -> str:
    """One model: status, gates, before/after, the per-pass table and the pass charts."""

    def shown(text: str) -> str:
        return escape(text.replace(base.rstrip("/") + "/", "") if base else text)

    parts = [f'<section><h2>{escape(result.name)} <span class="{_css(result.status)}">'
             f"{escape(result.status)}</span></h2>"]
    if result.message and result.status != "cached":
        parts.append(f"<pre>{shown(result.message.strip())}</pre>")
    report = result.report
    if report is None:
        return "".join(parts) + "</section>"
    build = report.get("build", {})
    parts.append(f"<p><code>{shown(build.get('model', ''))}</code> &rarr; "
                 f"<code>{shown(str(report.get('output_path')))}</code>, pipeline "
                 f"<code>{escape(build.get('pipeline', ''))}</code></p>")
    gates = ", ".join(f"{k} = {v}" for k, v in build.get("gates", {}).items()) or "none"
    parts.append(f"<p>Gates: {escape(gates)}; quality floor: "
                 f"{escape(str(report.get('quality_floor') or 'none'))}</p>")
    parts.append(diff_table(report))
    parts.append(pass_table(report))
    for note in (report.get("validation_note"), report.get("validation_source")):
        if note:
            parts.append(f'<p class="note">{shown(note)}</p>')
            break
    for record in report["passes"]:
        chart = CHARTS.get(record["name"].split("(", 1)[0])
        svg = chart(record["stats"]) if chart and record["status"] == "kept" else None
        if svg:
            parts.append(f"<div>{svg}</div>")
    return "".join(parts) + "</section>"


def diff_table(report: dict[str, Any]) -> str:
    """Nodes, params, MACs and size before and after, with the ratio."""
    f = figures(report)
    o, n = f["original"], f["final"]
    rows = [[name, fmt(o[key]), fmt(n[key]), ratio(n[key], o[key])]
            for name, key, fmt in (("nodes", "nodes", str), ("params", "params", _num),
                                   ("MACs per sample", "macs", _num),
                                   ("size", "bytes", _bytes))]
    if f["original_accuracy"] is not None:
        rows.append(["accuracy", _pct(f["original_accuracy"]), _pct(f["accuracy"]), ""])
    if f["agreement"] is not None:
        rows.append(["top-1 agreement with the original", "", f"{f['agreement']:.4f}", ""])
    return table(["", "original", "optimized", "ratio"], rows)


def pass_table(report: dict[str, Any]) -> str:
    """One row per pass, as ``onnxopt`` prints it (each pass against the stage before)."""
    rows = []
    for p in report["passes"]:
        name = p["name"].replace(",", ", ")  # long option lists may wrap
        prev, orig, after = p["vs_previous"], p["vs_original"], p["after"]
        rows.append([
            name + ("" if p["exact"] else " ~"), p["status"], str(after["nodes"]),
            _num(after["params"]), _num(after["macs"]), _bytes(after["bytes"]),
            "" if prev is None else f"{prev['max_abs_error']:.2g}",
            "" if prev is None or prev["agreement"] is None else f"{prev['agreement']:.3f}",
            "" if orig is None else _pct(orig["accuracy"]), f"{p['seconds']:.2f}s",
            (p["message"] or p["summary"] or "")[:160]])
    return table(["pass", "status", "nodes", "params", "MACs", "size", "max err", "agree",
                  "acc", "time", "note"], rows, status_column=1, text_columns=(0, 10))


def _prune_chart(stats: dict[str, Any]) -> str | None:
    groups = stats.get("groups") or []
    if not groups:
        return None
    bars = [Bar(", ".join(g["producers"][:2]), g["kept"], f"{g['kept']}/{g['total']}",
                g["total"]) for g in groups]
    return bar_chart("prune: channels kept per group", bars)


def _quantize_chart(stats: dict[str, Any]) -> str | None:
    sqnr = stats.get("node_sqnr_db") or {}
    finite = {k: v for k, v in sqnr.items() if isinstance(v, (int, float))}
    if not finite:
        return None
    bars = [Bar(name, max(value, 0.0), f"{value:.1f} dB") for name, value in finite.items()]
    return bar_chart("quantize: SQNR of each quantized node's output (dB)", bars)


def _early_exit_chart(stats: dict[str, Any]) -> str | None:
    calibration = stats.get("calibration") or {}
    exits = calibration.get("exits") or []
    if not exits:
        return None
    bars = [Bar(f"{e.get('name', '')} {e.get('cut', '')}", e.get("fraction", 0.0),
                f"{100 * e.get('fraction', 0.0):.1f}%", 1.0) for e in exits]
    return bar_chart("early-exit: share of samples leaving at each exit", bars)


CHARTS.update({"prune": _prune_chart, "quantize": _quantize_chart,
               "early-exit": _early_exit_chart})


def _css(text: str) -> str:
    return text.replace(" ", "-")


def sweep_page(result: Any) -> str:
    """The sweep report: the table, and quality against latency and against MACs."""
    from onnxopt.build.svg import Point, scatter
    from onnxopt.build.sweep_table import format_table

    batch = result.primary_batch
    original = result.rows[0]
    quality = "top-1 accuracy" if result.labelled else "top-1 agreement"
    rows = [original, *result.candidates()]
    by_latency, by_macs = [], []
    for r in rows:
        y = r.quality(result.labelled)
        if y is None:
            continue
        by_latency.append(Point(r.latency[batch].ratio, y, r.label, r.pareto))
        if r.macs and original.macs:
            by_macs.append(Point(r.macs / original.macs, y, r.label, r.pareto))
    text = format_table(result)
    body = [f"<p><code>{escape(result.model)}</code>: {len(result.rows) - 1} variants, "
            f"built {escape(result.executor)}. Orange: the Pareto front (quality against "
            f"latency at batch {batch}).</p>",
            "<div>" + scatter(f"{quality} vs latency (batch {batch})", by_latency,
                              "latency, x the original", quality)
            + scatter(f"{quality} vs MACs", by_macs, "MACs, x the original", quality)
            + "</div>",
            f"<pre>{escape(text)}</pre>"]
    return page(f"onnxopt sweep: {result.model.rsplit('/', 1)[-1]}", body)
