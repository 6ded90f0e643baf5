"""Benchmark harness: every registered pipeline and the peer tools on the test models, side by side.

Usage (from the repository root, after ``pip install -e .[bench]``)::

    python benchmarks/run.py [--quick] [--out DIR] [--models digits,residual_blocks]

Writes ``latest.md``, ``latest.json`` and ``accuracy_vs_macs.png`` to ``DIR``
(default ``benchmarks/results``). See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The repository root first: testmodels/ is not installed, and the checkout's onnxopt must win
# over whatever the current folder holds.
for _path in (str(HERE), str(ROOT)):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

import latency  # noqa: E402
import measure  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import peers  # noqa: E402
import record  # noqa: E402
from catalog import PIPELINES, ModelEntry, PipelineEntry, models, plan_pipelines  # noqa: E402
from jobs import run_job  # noqa: E402
from machine import load_average, machine_info  # noqa: E402
from table import write_markdown  # noqa: E402

import onnxopt  # noqa: E402


class Progress:
    """One line per step on stderr, with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - self.start:7.1f}s] {text}\n")
        sys.stderr.flush()


def _latency_settings(quick: bool) -> dict[str, float]:
    """Warm-up time per session and minimum duration of one latency sample, in seconds."""
    return {"warmup_s": 0.15 if quick else 0.3, "min_sample_s": 0.002 if quick else 0.004}


def _row(label: str, kind: str, spec: str, group: str, out: Path, res: dict[str, Any],
         want_latency: bool, log: Progress) -> dict[str, Any]:
    """The result row of one optimizer or peer run, before measurement."""
    row: dict[str, Any] = {"label": label, "kind": kind, "spec": spec, "group": group,
                           "latency_wanted": want_latency}
    if not res.get("ok") or not out.exists():
        row.update(status=f"error: {res.get('error', 'no output written')}", path=None,
                   traceback=res.get("traceback", ""))
        log(f"  -> {row['status']}")
        return row
    row.update(status=res["status"], path=out, note=res.get("note", ""),
               optimizer={k: res[k] for k in ("wall_s", "peak_rss_mb")})
    if res.get("report"):
        row.update(passes=record.pass_summaries(res["report"]),
                   expected_macs=record.expected_macs(res["report"]))
    log(f"  -> {row['status']}, {res['wall_s']:.2f}s, peak +{res['peak_rss_mb']:.0f} MB")
    return row


def _optimize(entry: ModelEntry, pipelines: list[PipelineEntry], original: Path, folder: Path,
              eval_npz: Path, calib_npz: Path, timeout: float,
              log: Progress) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of the original, every pipeline and every peer (their models written to
    ``folder``); and the memory method used."""
    rows: list[dict[str, Any]] = [{"label": "original", "kind": "original", "spec": "",
                                   "path": original, "status": "ok", "latency_wanted": True}]
    method = None
    for p in pipelines:
        if p.labelled_only and entry.labelled is None:
            continue
        log(f"{entry.name}: onnxopt {p.spec}")
        out = folder / f"opt_{len(rows)}.onnx"
        res = run_job({"kind": "onnxopt", "model": os.fspath(original), "spec": p.spec,
                       "calib": os.fspath(calib_npz) if p.needs_calib else None,
                       "eval": os.fspath(eval_npz), "output": os.fspath(out)}, timeout)
        rows.append(_row(p.label, "onnxopt", p.spec, p.group, out, res, p.latency, log))
        method = method or res.get("memory_method")
    for peer in peers.PEERS:
        if not peer.available():
            rows.append({"label": peer.label, "kind": "peer", "spec": "", "status":
                         f"skipped: {peer.module} is not installed", "path": None})
            log(f"{entry.name}: peer {peer.label} skipped ({peer.module} not installed)")
            continue
        log(f"{entry.name}: peer {peer.label}")
        out = folder / f"peer_{len(rows)}.onnx"
        res = run_job({"kind": "peer", "peer": peer.label, "model": os.fspath(original),
                       "calib": os.fspath(calib_npz), "output": os.fspath(out)}, timeout)
        rows.append(_row(peer.label, "peer", "", "peer", out, res, True, log))
        method = method or res.get("memory_method")
    return rows, method


def _measure(rows: list[dict[str, Any]], inputs: dict[str, np.ndarray],
             labels: np.ndarray | None, base_session: ort.InferenceSession,
             ref_logits: np.ndarray) -> dict[str, ort.InferenceSession]:
    """Cost, agreement, SQNR and accuracy of every row; returns the sessions to time."""
    reference = ref_logits.argmax(1)
    sessions: dict[str, ort.InferenceSession] = {}
    for row in rows:
        if row.get("path") is None or row["status"].startswith(("error", "skipped")):
            continue
        row.update(measure.measure_cost(row["path"]))
        expected = row.pop("expected_macs", None)
        if row["main_graph_only"]:
            row["expected_macs"] = expected
        session = base_session if row["kind"] == "original" else latency.bench_session(
            os.fspath(row["path"]))
        logits = measure.predict(session, inputs)
        top1 = logits.argmax(1)
        row["agreement"] = float(np.mean(top1 == reference))
        row["sqnr_db"] = measure.sqnr_db(ref_logits, logits)
        row["accuracy"] = None if labels is None else float(np.mean(top1 == labels))
        if row.get("latency_wanted"):
            sessions[row["label"]] = session
            if row["kind"] == "original":  # an A/A pair shows the noise floor
                twin = latency.bench_session(os.fspath(row["path"]))
                measure.predict(twin, inputs)  # the same history as every other session
                sessions["original (A/A)"] = twin
    base = rows[0]
    for row in rows:
        for key in ("params", "macs", "file_bytes"):
            if key in row:
                row[f"{key}_ratio"] = row[key] / base[key] if base[key] else None
    return sessions


def bench_model(entry: ModelEntry, pipelines: list[PipelineEntry], args: argparse.Namespace,
                work: Path, log: Progress) -> dict[str, Any] | None:
    """Optimize one model with every pipeline and peer, then measure all of them side by side."""
    built = entry.build(args.quick)
    if built is None:
        log(f"{entry.name}: builder not available, skipped")
        return None
    folder = work / entry.name
    folder.mkdir()
    if isinstance(built, onnx.ModelProto):
        original = folder / "original.onnx"
        onnx.save(built, original)
    else:
        original = Path(built)
    n_eval, n_calib = (32, 32) if args.quick else (64, 64)
    eval_npz = entry.labelled or measure.random_npz(folder / "eval.npz", original, n_eval, seed=1)
    calib_npz = entry.calib or measure.random_npz(folder / "calib.npz", original, n_calib, seed=2)
    rows, memory_method = _optimize(entry, pipelines, original, folder, eval_npz,
                                    calib_npz, args.timeout, log)

    log(f"{entry.name}: size, MACs, accuracy and agreement on {eval_npz.name}")
    base_session = latency.bench_session(os.fspath(original))
    inputs, labels = measure.load_inputs(eval_npz, [i.name for i in base_session.get_inputs()])
    ref_logits = measure.predict(base_session, inputs)
    sessions = _measure(rows, inputs, labels, base_session, ref_logits)
    reference = ref_logits.argmax(1)

    static = measure.static_batch(original)
    settings = _latency_settings(args.quick)
    lat: dict[int, dict[str, Any]] = {}
    for batch in args.batches:
        if static is not None and static != batch:
            log(f"{entry.name}: batch {batch} skipped (input batch is fixed at {static})")
            continue
        feed = {k: measure.take(v, batch) for k, v in inputs.items()}
        log(f"{entry.name}: latency batch {batch}, {len(sessions)} sessions x "
            f"{args.rounds} interleaved rounds")
        lat[batch] = latency.measure(
            sessions, feed, "original", rounds=args.rounds,
            warmup_seconds=settings["warmup_s"], sample_seconds=settings["min_sample_s"])
    aa = {str(b): record.latency_summary(s["original (A/A)"].to_dict())
          for b, s in lat.items() if "original (A/A)" in s}
    for row in rows:
        row["latency"] = {str(b): record.latency_summary(s[row["label"]].to_dict())
                          for b, s in lat.items() if row["label"] in s}
        path = row.pop("path", None)
        if args.keep_models and path is not None:
            row["file"] = os.fspath(path.relative_to(work) if path.is_relative_to(work)
                                    else path)
        row.pop("latency_wanted", None)
    return {"name": entry.name, "description": entry.description,
            "labelled": labels is not None, "eval_samples": len(reference),
            "original_classes": int(len(np.unique(reference))),
            "eval_data": eval_npz.name if entry.labelled else f"random normal ({len(reference)})",
            "calib_data": calib_npz.name if entry.calib else f"random normal ({n_calib})",
            "memory_method": memory_method, "rows": rows, "aa": aa}


def _selected(parser: argparse.ArgumentParser, what: str, csv: str,
              known: list[str]) -> set[str] | None:
    """The names picked by a comma-separated option (None: not given); unknown ones exit."""
    if not csv:
        return None
    wanted = set(csv.split(","))
    unknown = wanted - set(known)
    if unknown:
        parser.error(f"unknown {what}(s) {sorted(unknown)}; choose from {known}")
    return wanted


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="output folder (default benchmarks/results)")
    parser.add_argument("--models", default="", help="comma-separated subset of model names")
    parser.add_argument("--pipelines", default="",
                        help="comma-separated subset of pipeline labels (default: all)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved latency rounds (default 30; use at least 30 for "
                             "published numbers)")
    parser.add_argument("--batches", default="1,32", help="latency batch sizes (default 1,32)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds allowed per optimizer run")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep the optimized models in OUT/models")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or 30
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args, parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write ``latest.json``, ``latest.md`` and the plot to ``--out``."""
    args, parser = _parse_args(argv)
    log = Progress()
    model_entries = models()
    wanted = _selected(parser, "model", args.models, [m.name for m in model_entries])
    if wanted is not None:
        model_entries = [m for m in model_entries if m.name in wanted]
    elif args.quick:
        model_entries = [m for m in model_entries if not m.full_only]
    pipelines, skipped = plan_pipelines(args.quick)
    wanted = _selected(parser, "pipeline", args.pipelines, [p.label for p in PIPELINES])
    if wanted is not None:
        skipped += [{"label": p.label, "spec": p.spec, "reason": "not selected (--pipelines)"}
                    for p in pipelines if p.label not in wanted]
        pipelines = [p for p in pipelines if p.label in wanted]
    log(f"registered passes: {', '.join(onnxopt.registered_passes())}; running "
        f"{len(pipelines)} pipelines, skipping {len(skipped)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "config": {"quick": args.quick, "rounds": args.rounds, "batches": args.batches,
                   **_latency_settings(args.quick),
                   "threads": latency.THREADS, "command": " ".join(sys.argv)},
        "skipped_pipelines": skipped, "models": []}
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        for entry in model_entries:
            result = bench_model(entry, pipelines, args, Path(tmp), log)
            if result is None:
                continue
            results["models"].append(result)
            _write(results, args.out, log)
        if args.keep_models:
            shutil.copytree(tmp, args.out / "models", dirs_exist_ok=True)
    results["config"]["seconds"] = time.perf_counter() - log.start
    results["machine"]["load_average_end"] = load_average()
    _write(results, args.out, log, final=True)
    log(f"done in {results['config']['seconds']:.0f}s; wrote {args.out}")
    return 0


def _write(results: dict[str, Any], out: Path, log: Progress, final: bool = False) -> None:
    import plot

    record.write_json(results, out / "latest.json")
    write_markdown(results, out / "latest.md")
    if final:
        plot.accuracy_vs_macs(results, out / "accuracy_vs_macs.png")
        log(f"wrote {out / 'latest.md'}, latest.json, accuracy_vs_macs.png")


if __name__ == "__main__":
    sys.exit(main())
