"""The build summary: one row per entry in Markdown, and the HTML page beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnxopt.build.job import JobResult
from onnxopt.report import _bytes, _num, _pct

HEADERS = ["model", "status", "passes kept", "nodes", "params", "MACs", "size", "accuracy",
           "agreement", "time"]


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reviewer compares, from one JSON report (no timing in them)."""
    original, final = report["original"], report["final"]
    last = next((p["vs_original"] for p in reversed(report["passes"])
                 if p["status"] == "kept" and p["vs_original"]), None)
    accuracy = report["original_accuracy"]
    for p in reversed(report["passes"]):
        if p["status"] == "kept" and p["vs_original"] is not None:
            accuracy = p["vs_original"]["accuracy"]
            break
    return {
        "original": original, "final": final,
        "original_accuracy": report["original_accuracy"], "accuracy": accuracy,
        "agreement": None if last is None else last["agreement"],
        "max_abs_error": None if last is None else last["max_abs_error"],
        "passes_kept": [p["name"] for p in report["passes"] if p["status"] == "kept"],
        "statuses": [(p["name"], p["status"]) for p in report["passes"]],
    }


def ratio(new: float | None, old: float | None) -> str:
    """``0.512x``, or ``-`` when either side is unknown."""
    return f"{new / old:.3f}x" if old and new is not None else "-"


def summary_rows(results: list[JobResult]) -> list[list[str]]:
    """One row of text cells per entry (``HEADERS``)."""
    rows = []
    for r in results:
        if r.report is None:
            rows.append([r.name, r.status, "", "", "", "", "", "", "", f"{r.seconds:.1f}s"])
            continue
        f = figures(r.report)
        o, n = f["original"], f["final"]
        arrow = " → "
        rows.append([
            r.name, r.status, ", ".join(p.replace(",", ", ") for p in f["passes_kept"])
            or "none",
            f"{o['nodes']}{arrow}{n['nodes']}",
            f"{_num(o['params'])}{arrow}{_num(n['params'])}",
            f"{_num(o['macs'])}{arrow}{_num(n['macs'])} ({ratio(n['macs'], o['macs'])})",
            f"{_bytes(o['bytes'])}{arrow}{_bytes(n['bytes'])} ({ratio(n['bytes'], o['bytes'])})",
            (f"{_pct(f['original_accuracy'])}{arrow}{_pct(f['accuracy'])}"
             if f["original_accuracy"] is not None else ""),
            "" if f["agreement"] is None else f"{f['agreement']:.4f}",
            "cached" if r.status == "cached" else f"{r.seconds:.1f}s",
        ])
    return rows


def markdown(results: list[JobResult], title: str, executor: str) -> str:
    """The summary as a Markdown page: the table, then what went wrong, entry by entry."""
    lines = [f"# {title}", "", f"{len(results)} models, run {executor}.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
              for row in summary_rows(results)]
    problems = [r for r in results if r.message and r.status != "cached"]
    if problems:
        lines += ["", "## Problems", ""]
        for r in problems:
            first = r.message.strip().splitlines()[0]
            lines.append(f"- **{r.name}** ({r.status}): {first}")
    return "\n".join(lines) + "\n"


def write_summaries(outcome: Any) -> list[Path]:
    """Write ``summary.md`` and ``summary.html`` into the recipe's ``out_dir``."""
    from onnxopt.build.html import build_page
    from onnxopt.model_io import write_text

    out = outcome.recipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    title = f"onnxopt build: {outcome.recipe.path.name}"
    md = write_text(out / "summary.md", markdown(outcome.results, title, outcome.executor))
    page = write_text(out / "summary.html", build_page(
        outcome.results, title, outcome.executor, str(outcome.recipe.path.resolve().parent)))
    return [md, page]
