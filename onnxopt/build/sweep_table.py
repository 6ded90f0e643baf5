"""The sweep's table: one row per variant beside the original, as text or Markdown."""

from __future__ import annotations

from typing import Any

from onnxopt.report import _bytes, _num, _pct


def format_table(result: Any, *, markdown: bool = False) -> str:
    """Quality, MACs, size and latency ratios of every variant; ``*`` marks the Pareto front.

    Args:
        result: A :class:`onnxopt.build.sweep.SweepResult`.
        markdown: A Markdown table instead of aligned text.
    """
    original = result.rows[0]
    headers = ["variant", "pipeline", "status", "MACs", "size", "params",
               "accuracy" if result.labelled else "agreement"]
    headers += [f"latency b{b}" for b in result.batch_sizes] + ["pareto"]
    rows = []
    for r in result.rows:
        first = r is original
        quality = r.quality(result.labelled)
        cells = [r.label, r.pipeline or "(input model)", r.status,
                 _num(r.macs) if first else _ratio(r.macs, original.macs),
                 _bytes(r.bytes) if first and r.bytes else _ratio(r.bytes, original.bytes),
                 _num(r.params) if first else _ratio(r.params, original.params),
                 "" if quality is None else (_pct(quality) if result.labelled
                                             else f"{quality:.4f}")]
        for b in result.batch_sizes:
            lat = r.latency.get(b)
            cells.append("" if lat is None else
                         f"1 ({lat.median_ms:.2f} ms)" if first else
                         f"{lat.ratio:.2f}x [{lat.q1:.2f}-{lat.q3:.2f}]")
        cells.append("*" if r.pareto else "")
        rows.append(cells)
        if first:
            noise = ["original (A/A)", "noise floor", "", "", "", "", ""]
            noise += [f"{result.noise[b].ratio:.2f}x [{result.noise[b].q1:.2f}-"
                      f"{result.noise[b].q3:.2f}]" if b in result.noise else ""
                      for b in result.batch_sizes]
            rows.append([*noise, ""])
    notes = [f"latency: median of interleaved paired ratios to the original [interquartile "
             f"range]; the A/A row times the original against itself (the noise); pareto "
             f"(*): no other model has higher {headers[6]} and lower latency at batch "
             f"{result.primary_batch}; built {result.executor}"]
    failed = [r for r in result.rows[1:] if r.message and r.status not in ("built", "cached")]
    notes += [f"{r.label}: {r.status}: {r.message.strip().splitlines()[0]}" for r in failed]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines + [""] + notes)
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, ["-" * w for w in widths], *rows]]
    return "\n".join(lines + notes)


def _ratio(new: float | None, old: float | None) -> str:
    return f"{new / old:.3f}x" if old and new is not None else "-"
