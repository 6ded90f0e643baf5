"""corpus.md: the corpus results as Markdown (header, one row per model and pipeline, errors)."""

from __future__ import annotations

import math
import os
import site
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.corpus.fetch import cache_dir

ROOT = Path(__file__).resolve().parents[2]


def _places() -> list[tuple[str, str]]:
    """Machine-specific folders and the neutral names they are shown as."""
    places = [(str(cache_dir()), "<corpus cache>"), (str(ROOT), "."),
              (tempfile.gettempdir(), "<tmp>"), (sys.prefix, "<venv>")]
    places += [(p, "<site-packages>") for p in site.getsitepackages()]
    places.append((str(Path.home()), "~"))
    return sorted(places, key=lambda kv: -len(kv[0]))


def neutral(text: str) -> str:
    """``text`` with this machine's folders replaced by neutral names."""
    for path, name in _places():
        if path and path != os.sep:
            text = text.replace(path, name)
    return text


def clean(obj: Any) -> Any:
    """JSON-ready: non-finite floats as strings, machine folders neutral, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, str):
        return neutral(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _num(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def _change(before: float | None, after: float | None, fmt: Any = str) -> str:
    """``before → after (ratio)``; an unknown figure (``None``) shows as "unknown"."""
    if before is None or after is None:
        return (f"{'unknown' if before is None else fmt(before)} → "
                f"{'unknown' if after is None else fmt(after)}")
    ratio = f" ({after / before:.3f}x)" if before else ""
    return f"{fmt(before)} → {fmt(after)}{ratio}"


def _passes(row: dict[str, Any]) -> str:
    return ", ".join(f"{p['name']} {p['status']}" for p in row.get("passes", []))


def _worst_exact(row: dict[str, Any]) -> str:
    """The worst error of an exact pass against the model before it, and its tolerance."""
    compared = [p["vs_previous"] for p in row.get("passes", [])
                if p["exact"] and p.get("vs_previous")]
    if not compared:
        return ""
    worst = max(compared, key=lambda c: (_float(c["needed_rtol"]), _float(c["max_abs_error"])))
    sign = "≤" if _float(worst["needed_rtol"]) <= worst["rtol"] else ">"
    return (f"{_g(worst['max_abs_error'])}; rtol needed {_g(worst['needed_rtol'])} {sign} "
            f"{worst['rtol']:g} (atol {worst['atol']:g})")


def _lossy(row: dict[str, Any]) -> str:
    """The last lossy pass's metrics against the original model."""
    for p in reversed(row.get("passes", [])):
        c = p.get("vs_original")
        if not p["exact"] and c:
            text = f"SQNR {_g(c['sqnr_db'], 3)} dB"
            if c.get("agreement") is not None:
                text += f", agree {c['agreement']:.3f}"
            return text
    return ""


def _recheck(row: dict[str, Any]) -> str:
    r = row.get("recheck")
    if not r:
        return ""
    if "error" in r:
        return f"does not run: {r['error']}"
    if row["pipeline"].startswith(("exact", "onnxsim")):
        verdict = "ok" if r["within"] else "FAIL"
        noise = f", or <= {_g(r['noise_abs'])} (8x noise)" if r.get("noise_abs") else ""
        return (f"{verdict} (max {_g(r['max_abs_error'])}, rtol needed "
                f"{_g(r['needed_rtol'])}{noise})")
    text = f"SQNR {_g(r['sqnr_db'], 3)} dB"
    if r.get("agreement") is not None:
        text += f", agree {r['agreement']:.3f}"
    return text


def _float(x: Any) -> float:
    return float(x) if not isinstance(x, str) else float(x.replace("Infinity", "inf"))


def _g(x: Any, digits: int = 2) -> str:
    value = _float(x)
    return str(value) if not math.isfinite(value) else f"{value:.{digits}g}"


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def summary_table(results: dict[str, Any]) -> str:
    """One row per model and pipeline: exit, pass statuses, nodes, MACs, errors, time."""
    head = ["model", "pipeline", "exit", "passes", "nodes", "MACs", "max err vs tolerance",
            "re-check (fresh onnxruntime)", "time"]
    lines = [_line(head), "|" + "---|" * len(head)]
    for row in results["rows"]:
        nodes = _change(*row["nodes"]) if row.get("nodes") else ""
        macs = ""
        if row.get("original"):
            macs = _change(row["original"]["macs"], row["final"]["macs"], _num)
            if row.get("expected_macs_ratio") is not None:
                macs += f"; expected {row['expected_macs_ratio']:.3f}x"
        error = _worst_exact(row) if row["pipeline"].startswith("exact") else _lossy(row)
        lines.append(_line([row["model"], row["pipeline"], str(row["exit"]), _passes(row),
                            nodes, macs, error, _recheck(row), f"{row['seconds']:.1f}s"]))
    return "\n".join(lines)


def _models_table(results: dict[str, Any]) -> list[str]:
    head = ["model", "task", "package", "file in the wheel", "opsets", "nodes", "size",
            "licence"]
    lines = [_line(head), "|" + "---|" * len(head)]
    for m in results["models"]:
        opsets = ", ".join(f"{d} {v}" for d, v in m.get("opsets", {}).items())
        size = f"{m['bytes'] / 2**20:.2f} MB" if "bytes" in m else ""
        lines.append(_line([m["name"], m["task"], f"`{m['package']}`", f"`{m['member']}`",
                            opsets, str(m.get("nodes", "")), size, m["licence"]]))
    return lines


def _errors(results: dict[str, Any]) -> list[str]:
    lines = []
    for row in results["rows"]:
        if row.get("error"):
            lines.append(f"- {row['model']} / {row['pipeline']}: exit {row['exit']}: "
                         f"`{neutral(row['error'])[:300]}`")
        for p in row.get("passes", []):
            if p["status"] in ("rolled back", "crashed", "gate failed") and p.get("message"):
                first = neutral(p["message"]).splitlines()[0]
                if first[:80] in neutral(row.get("error") or ""):
                    continue  # the exit line above already says it
                lines.append(f"- {row['model']} / {row['pipeline']}: {p['name']} {p['status']}"
                             f": {neutral(p['message']).splitlines()[0][:300]}")
    return lines or ["(none)"]


def _exact_ok(row: dict[str, Any]) -> bool:
    """Exit 0, every pass kept or unchanged, and the re-check within tolerance."""
    return (row["exit"] == 0 and bool(row.get("passes"))
            and all(p["status"] in ("kept", "unchanged") for p in row["passes"])
            and bool((row.get("recheck") or {}).get("within")))


def _counts(results: dict[str, Any]) -> str:
    rows = [r for r in results["rows"] if r["pipeline"] not in ("onnxsim", "-")]
    clean_exit = sum(1 for r in rows if r["exit"] == 0)
    failed = sum(1 for r in rows for p in r.get("passes", []) if p["status"] in
                 ("rolled back", "crashed", "gate failed"))
    cli = {r["model"] for r in rows if r["pipeline"] == "exact" and _exact_ok(r)}
    api = {r["model"] for r in rows if r["pipeline"] == "exact (API)" and _exact_ok(r)} - cli
    return (f"{len(rows)} runs on {len(results['models'])} models: {clean_exit} exited 0, "
            f"{len(rows) - clean_exit} did not; {failed} passes were rolled back or crashed. "
            f"The exact pipeline kept the outputs (exit 0, every pass kept or unchanged, "
            f"re-check within tolerance) on {len(cli)} of {len(results['models'])} models "
            f"through the command line" + (f", and on {len(api)} more through the API with "
                                           "feed dicts" if api else "") + ".")


def markdown(results: dict[str, Any]) -> str:
    """The whole of corpus.md."""
    m, c = results["machine"], results["config"]
    seconds = f", {c['seconds']:.0f} s" if "seconds" in c else " (running)"
    pipelines = "\n".join(f"- `{label}`: `{spec}`" for label, spec in c["pipelines"].items())
    lines = [
        "# Real-world corpus",
        "",
        f"Measured {m['date']} with `{neutral(c['command'])}`"
        + (f" at commit {c['commit']}" if c.get("commit") else "")
        + f"{seconds} on {m['cpu']} "
        f"({m['usable_cpus']} usable CPUs, int8 VNNI: {'yes' if m['vnni'] else 'no'}), "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, "
        f"onnx-ir {m['onnx_ir']}, numpy {m['numpy']}, onnxopt {m['onnxopt']}; load average "
        f"{m['load_average_start']} at the start"
        + (f", {m['load_average_end']} at the end" if m.get("load_average_end") else "")
        + " (times are wall times of the whole CLI run, on a shared machine).",
        "",
        "Production models that pip packages ship (none trained by this project), each run "
        "through the `onnxopt` command line in a fresh process per pipeline, with "
        f"{c['eval_samples']} realistic evaluation samples (`--eval`) and, for lossy passes, "
        f"{c['calib_samples']} calibration samples (`--calib`"
        + "".join(f"; {label} at least {n}, as it needs them"
                  for label, n in c.get("min_calib", {}).items())
        + "); see "
        "`benchmarks/corpus/inputs.py`. Pipelines:",
        "",
        pipelines,
        "",
        "`early-exit` runs only on classifiers. Rows marked *(API)* run the same pipeline "
        "through `onnxopt.optimize` with one feed dict per session call, for models whose "
        "inputs are not batch-first (silero: `state` has the samples on axis 1, `sr` is 0-d), "
        "a cross-check of the `.npz` path; their *exit* follows the CLI's codes. *exit* is "
        "the CLI's exit code (without "
        "`--strict`, a rolled-back pass still exits 0; its status says so). *nodes* counts "
        "the nodes of the input and output files, subgraphs included. *MACs* are onnxopt's "
        "per-sample count from its report (for early exit the worst case, every sample to the "
        "end, then the expected ratio from where the held-out threshold samples exit). "
        "*max err vs tolerance*: for the exact pipeline the "
        "worst exact pass against the model before it, with the tolerance onnxopt held it to; "
        "for lossy pipelines the last lossy pass against the original. *re-check*: the "
        "written model and the input model in fresh onnxruntime sessions on the same "
        "evaluation data (exact: within the tolerance above; lossy: SQNR and top-1 "
        "agreement)." + (" The `onnxsim` rows are `onnxsim.simplify()` on the same model."
                          if c.get("onnxsim") else
                          " onnxsim was skipped (`--no-onnxsim`)." if c.get("onnxsim_skipped")
                          else " onnxsim was not installed."),
        "",
        _counts(results),
        "",
        summary_table(results),
        "",
        "## Errors and rolled-back passes",
        "",
        *_errors(results),
        "",
        "## Models",
        "",
        *_models_table(results),
        "",
    ]
    return neutral("\n".join(lines))
