"""latest.md: the benchmark results rendered as markdown (header, headline and per-model tables)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def _num(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


def _line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(head: list[str]) -> list[str]:
    return [_line(head), "|" + "---|" * len(head)]


def _with_ratio(row: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    if key not in row:
        return ""
    if row["kind"] == "original":
        return fmt(row[key])
    return f"{fmt(row[key])} ({row[f'{key}_ratio']:.3f}x)"


def _paired_ratio(stats: dict[str, Any] | None) -> str:
    """Median paired latency ratio [interquartile range]; empty when not measured."""
    if not stats:
        return ""
    return f"{stats['ratio']:.2f}x [{stats['ratio_q1']:.2f}-{stats['ratio_q3']:.2f}]"


def _latency_cell(row: dict[str, Any], batch: str) -> str:
    stats = row.get("latency", {}).get(batch)
    if stats and row["kind"] == "original":
        return f"1 ({stats['median_ms']:.2f} ms)"
    return _paired_ratio(stats)


def _expected_ratio(model: dict[str, Any], row: dict[str, Any]) -> float:
    """A row's expected (data-dependent) MACs over the original's MACs."""
    return row["expected_macs"] / model["rows"][0]["macs"]


def markdown_table(model: dict[str, Any], batches: list[int]) -> list[str]:
    """The results table of one model, one row per variant."""
    head = ["variant", "pipeline", "status", "params", "MACs", "size", "top-1", "agree",
            "SQNR", *(f"latency b{b}" for b in batches), "opt time", "opt peak mem"]
    lines = _head(head)
    aa = model.get("aa", {})
    for row in model["rows"]:
        opt = row.get("optimizer") or {}
        spec = f"`{row['spec']}`" if row["spec"] else ("" if row["kind"] == "original"
                                                      else "(peer)")
        macs = _with_ratio(row, "macs", _num)
        if row.get("main_graph_only"):
            macs += " main graph only"
            if row.get("expected_macs"):
                macs += (f"; expected {_num(row['expected_macs'])} "
                         f"({_expected_ratio(model, row):.3f}x)")
        lines.append(_line([
            row["label"], spec, row["status"],
            _with_ratio(row, "params", _num), macs,
            _with_ratio(row, "file_bytes", _size),
            "" if row.get("accuracy") is None else f"{100 * row['accuracy']:.2f}%",
            "" if row.get("agreement") is None else f"{row['agreement']:.3f}",
            "" if "agreement" not in row or row["kind"] == "original" else (
                "identical" if row.get("sqnr_db") is None else f"{row['sqnr_db']:.1f} dB"),
            *(_latency_cell(row, str(b)) for b in batches),
            "" if opt.get("wall_s") is None else f"{opt['wall_s']:.2f} s",
            "" if opt.get("peak_rss_mb") is None else f"+{opt['peak_rss_mb']:.0f} MB"]))
        if row["kind"] == "original" and aa:
            lines.append(_line(["original (A/A)", "same file, second session", "noise floor",
                                "", "", "", "", "", "",
                                *(_paired_ratio(aa.get(str(b))) for b in batches), "", ""]))
    return lines


def headline_table(model: dict[str, Any], batches: list[int]) -> list[str]:
    """A short table of a labelled model, for the project README."""
    head = ["variant", "MACs", "size", "top-1", *(f"latency b{b}" for b in batches)]
    lines = [f"## Headline: {model['name']}", "", *_head(head)]
    aa = model.get("aa", {})
    for row in model["rows"]:
        if "macs" not in row:
            continue
        macs = (f"{_expected_ratio(model, row):.2f}x expected" if row.get("expected_macs")
                else f"{row['macs_ratio']:.2f}x")
        lines.append(_line([
            row["label"] if row["kind"] != "peer" else f"peer: {row['label']}",
            "1" if row["kind"] == "original" else macs,
            _size(row["file_bytes"]) if row["kind"] == "original"
            else f"{row['file_bytes_ratio']:.2f}x",
            "" if row.get("accuracy") is None else f"{100 * row['accuracy']:.2f}%",
            *(_latency_cell(row, str(b)) for b in batches)]))
        if row["kind"] == "original" and aa:
            lines.append("| original (A/A): noise floor | | | | " + " | ".join(
                _paired_ratio(aa.get(str(b))) for b in batches) + " |")
    return [*lines, ""]


def _header(results: dict[str, Any]) -> list[str]:
    """Title, machine, versions and method."""
    m, cfg = results["machine"], results["config"]
    vnni = f"yes ({', '.join(m['vnni_flags'])})" if m["vnni"] else "no"
    mem = next((model["memory_method"] for model in results["models"]
                if model.get("memory_method")), "n/a")
    return [
        "# onnxopt benchmark results", "",
        f"- date: {m['date']}; mode: {'quick' if cfg['quick'] else 'full'}"
        + (f"; harness wall time {cfg['seconds']:.0f} s" if "seconds" in cfg else ""),
        f"- CPU: {m['cpu']}; int8 VNNI: {vnni}; {m['usable_cpus']} usable of "
        f"{m['logical_cpus']} logical CPUs; load average (1/5/15 min) at start "
        f"{m['load_average_start']}" + (f", at end {m['load_average_end']}"
                                        if "load_average_end" in m else ""),
        f"- onnxruntime {m['onnxruntime']} (CPUExecutionProvider), onnx {m['onnx']}, "
        f"onnx-ir {m['onnx_ir']}, numpy {m['numpy']}, Python {m['python']}, "
        f"onnxopt {m['onnxopt']}; {m['platform']}",
        f"- latency: {cfg['threads']} intra-op threads (spinning off), each session warmed "
        f"up (>= 3 runs and {cfg['warmup_s']:g} s; one sample = mean of runs lasting >= "
        f"{1e3 * cfg['min_sample_s']:g} ms), then {cfg['rounds']} rounds; each round visits "
        "every variant in random order and times it right next to the original (A/B pair, "
        "random which first); cell = median "
        "of the paired ratios variant/original [interquartile range]; the original's cell "
        "gives its median time for reference only"
        + ("; **fewer than 30 rounds: a smoke run, not for publishing**"
           if cfg["rounds"] < 30 else ""),
        f"- opt time / peak mem: wall time of the whole `onnxopt.optimize` call (load, passes, "
        f"onnxruntime validation on the eval data, save) or of the peer tool, each in a fresh "
        f"process (forked from a server that only imported the libraries); peak RSS above the "
        f"RSS before the call, measured by {mem}",
        "- MACs per sample from `onnxopt.cost` (Q/DQ nodes count as elementwise; "
        "with control flow only the main graph is counted, and a pass's own expected MACs on "
        "calibration data are shown); size = bytes on disk; agree = top-1 agreement with the "
        "original on the eval data; SQNR = output signal-to-noise ratio against the "
        "original's logits",
        "",
    ]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Render ``latest.md``: machine header, method, one table per model, skipped rows."""
    batches = results["config"]["batches"]
    lines = _header(results)
    for model in results["models"]:
        if model["labelled"]:
            lines += headline_table(model, batches)
    for model in results["models"]:
        lines += [f"## {model['name']}", "",
                  f"{model['description']}. Eval: {model['eval_data']}; calibration: "
                  f"{model['calib_data']}. Distinct classes the original predicts on the eval "
                  f"data: {model['original_classes']}"
                  + ("" if model["original_classes"] > 2 else
                     " (so top-1 agreement says little here; see SQNR)") + ".", ""]
        lines += markdown_table(model, batches)
        notes = [f"- {r['label']}: {r['note']}" for r in model["rows"] if r.get("note")]
        lines += ["", *notes, ""] if notes else [""]
    if results["skipped_pipelines"]:
        lines += ["## Not run", ""]
        lines += [f"- {s['label']} (`{s['spec']}`): {s['reason']}"
                  for s in results["skipped_pipelines"]]
        lines.append("")
    path.write_text("\n".join(lines))
