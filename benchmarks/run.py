"""Benchmark harness: every registered pipeline and the peer tools on the test models, side by side.

Usage (from the repository root, after ``pip install -e .[bench]``)::

    python benchmarks/run.py [--quick] [--out DIR] [--models digits,residual_blocks]

Writes ``latest.md``, ``latest.json`` and ``accuracy_vs_macs.png`` to ``DIR``
(default ``benchmarks/results``). See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import peers  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.analysis.cost import infer_shapes, model_cost  # noqa: E402
from onnxopt.model_io import file_size  # noqa: E402

# -- what is run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineEntry:
    """One row of the benchmark: a pipeline spec run through ``onnxopt.optimize``.

    Attributes:
        label: Row label.
        spec: Pipeline spec; the row runs only when every pass in it is registered.
        needs_calib: Give the calibration data to ``optimize``.
        group: Rows of one group are joined by a line in the plot (budgets of a criterion).
        latency: Measure latency (criterion sweeps only need size and accuracy).
        full_only: Skip in ``--quick``.
        labelled_only: Run only on models with labelled data (accuracy sweeps).
    """

    label: str
    spec: str
    needs_calib: bool = False
    group: str = ""
    latency: bool = True
    full_only: bool = False
    labelled_only: bool = False


_BASE = "cleanup,fold-bn"
#: Every pipeline of the benchmark. Later passes add their rows here.
PIPELINES: list[PipelineEntry] = [
    PipelineEntry("cleanup", "cleanup"),
    PipelineEntry("fold-bn", _BASE),
    PipelineEntry("fuse-resconv", f"{_BASE},fuse-resconv"),
    PipelineEntry("prune-zero", f"{_BASE},prune-zero"),
    PipelineEntry("dead-layers", f"{_BASE},prune-zero,dead-layers"),
    *(PipelineEntry(f"prune -{100 - keep}% MACs", f"{_BASE},prune(macs={keep / 100:g})",
                    needs_calib=True, group="prune (default criterion)", full_only=keep != 50)
      for keep in (70, 50, 30)),
    *(PipelineEntry(f"prune -{100 - keep}% MACs ({crit})",
                    f"{_BASE},prune(macs={keep / 100:g},criterion={crit})",
                    needs_calib=True, group=f"prune {crit}", latency=False, full_only=True,
                    labelled_only=True)
      for crit in ("l1", "l2", "random") for keep in (70, 50, 30)),
    PipelineEntry("quantize", f"{_BASE},quantize", needs_calib=True),
    PipelineEntry("prune -50% + quantize", f"{_BASE},prune(macs=0.5),quantize", needs_calib=True),
    PipelineEntry("early-exit", f"{_BASE},early-exit", needs_calib=True),
]


@dataclass(frozen=True)
class ModelEntry:
    """A benchmark model and the data it is measured on.

    Attributes:
        name: Short name (``--models``).
        description: One line for the report.
        build: ``build(quick)`` returns a ``ModelProto`` or a path; None if unavailable.
        labelled: Path of a labelled eval ``.npz``; None means random inputs, no labels.
        calib: Path of a calibration ``.npz`` (None: random inputs).
        full_only: Skip in ``--quick``.
    """

    name: str
    description: str
    build: Callable[[bool], onnx.ModelProto | Path | None]
    labelled: Path | None = None
    calib: Path | None = None
    full_only: bool = False


def _structure(name: str, full: tuple[int, int], quick: tuple[int, int]):
    def build(is_quick: bool) -> onnx.ModelProto:
        from testmodels import STRUCTURES

        width, size = quick if is_quick else full
        return STRUCTURES[name](seed=0, width=width, size=size, batch="N")
    return build


def _resconv_bench(repvgg: bool):
    def build(is_quick: bool) -> onnx.ModelProto | None:
        try:
            from testmodels.resconv import resconv_bench_model
        except ImportError:  # the builder arrives with the fuse-resconv work
            return None
        width, size, depth = (16, 16, 4) if is_quick else (64, 32, 8)
        kwargs = {"repvgg": True} if repvgg else {}
        return resconv_bench_model(width=width, size=size, depth=depth, **kwargs)
    return build


def _sizes(name: str, full: tuple[int, int], quick: tuple[int, int]) -> str:
    return f"{name}: random weights, width/size {full[0]}/{full[1]} (quick {quick[0]}/{quick[1]})"


def _models() -> list[ModelEntry]:
    from testmodels import DIGITS_CALIB, DIGITS_EVAL, DIGITS_MODEL

    return [
        ModelEntry("digits", "trained digits ResNet (testmodels/digits_resnet.onnx)",
                   lambda _quick: DIGITS_MODEL, DIGITS_EVAL, DIGITS_CALIB),
        ModelEntry("residual_blocks", _sizes("ResNet basic blocks", (64, 48), (16, 32)),
                   _structure("residual_blocks", (64, 48), (16, 32))),
        ModelEntry("inverted_residual", _sizes("MobileNetV2 blocks", (64, 48), (16, 32)),
                   _structure("inverted_residual", (64, 48), (16, 32))),
        ModelEntry("resconv_bench", "ResConv blocks `Relu(x + a*BN(Conv3x3(x)))`: "
                   "testmodels.resconv.resconv_bench_model, width/size/depth 64/32/8 "
                   "(quick 16/16/4)", _resconv_bench(repvgg=False)),
        ModelEntry("repvgg_bench", "RepVGG blocks (3x3+BN, 1x1+BN, identity BN): "
                   "resconv_bench_model(repvgg=True), width/size/depth 64/32/8",
                   _resconv_bench(repvgg=True), full_only=True),
    ]


# -- machine --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, int8 VNNI support, cores and library versions for the report header."""
    cpu, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = match.group(1).strip() if match else cpu
        match = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(match.group(1).split()) if match else set()
    except OSError:
        pass
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import onnx_ir

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "vnni": bool(vnni), "vnni_flags": vnni,
        "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__, "numpy": np.__version__,
        "onnxopt": onnxopt.__version__, "load_average_start": _load_average(),
    }


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# -- optimizer runs: one fresh process each, for a clean wall time and peak memory -----------


def _rss_bytes() -> int:
    try:
        import psutil
    except ImportError:  # psutil is a bench extra; Linux has the number in /proc
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRss:
    """Peak resident memory of this process inside a ``with`` block, above the RSS at entry.

    Exact where Linux allows resetting the high-water mark (``/proc/self/clear_refs``
    then ``VmHWM``); otherwise a thread samples RSS every 5 ms (psutil).
    """

    def __enter__(self) -> PeakRss:
        self.before = _rss_bytes()
        self.samples: list[int] = [self.before]
        self._stop = threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _vm_hwm_bytes()
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "psutil RSS sampled every 5 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.samples.append(_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = _vm_hwm_bytes()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.samples)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.before) / 2**20


def _worker(job: dict[str, Any], conn: Any) -> None:
    """Run one optimizer or peer job and send back its timing, memory and report."""
    result: dict[str, Any] = {"ok": False}
    try:
        onnxopt.registered_passes()  # imports happen outside the timed block
        if job["kind"] == "peer":
            peers.get_peer(job["peer"]).import_modules()
        with PeakRss() as mem:
            start = time.perf_counter()
            if job["kind"] == "onnxopt":
                _, report = onnxopt.optimize(
                    job["model"], job["spec"], calib=job["calib"], eval=job["eval"],
                    output=job["output"])
                result["report"] = json.loads(report.to_json())
                result["passes_s"] = sum(r.seconds for r in report.records)
                result["status"] = _status(report)
            else:
                result["note"] = peers.run_peer(job["peer"], job["model"], job["output"],
                                                job["calib"])
                result["status"] = "ok"
            result["wall_s"] = time.perf_counter() - start
        result.update(ok=True, peak_rss_mb=mem.delta_mb, rss_before_mb=mem.before / 2**20,
                      memory_method=mem.method)
    except BaseException as exc:  # reported as the row's status; the harness carries on
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        result["traceback"] = traceback.format_exc()
    conn.send(result)
    conn.close()


def _status(report: onnxopt.RunReport) -> str:
    if report.failures:
        return "; ".join(f"{r.name} {r.status}" for r in report.failures)
    unchanged = [r.name for r in report.records if r.status == "unchanged"]
    if len(unchanged) == len(report.records):
        return "unchanged"
    return "ok" + (f" ({', '.join(unchanged)} unchanged)" if unchanged else "")


#: Imported once by the fork server, so each job starts in milliseconds.
_PRELOAD = ["numpy", "onnx", "onnx_ir", "onnxruntime", "onnxruntime.quantization", "onnxopt",
            "onnxopt.passes", "latency", "peers"]


def _job_context() -> multiprocessing.context.BaseContext:
    """Fork-server processes on Linux (a clean parent that only imported the libraries);
    spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    # The fork server imports the preloads with its own sys.path (Python 3.11 passes it
    # neither ours nor the main script), so the checkout goes in through the environment.
    paths = [str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``_worker`` in a fresh process that holds none of the benchmark's memory."""
    ctx = _job_context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(job, child))
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            return parent.recv()
        return {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    except EOFError:
        return {"ok": False, "error": f"worker died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- measurement ----------------------------------------------------------------------------


def measure_cost(path: Path) -> dict[str, Any]:
    """Params, MACs per sample and bytes on disk of a model file.

    ``main_graph_only`` is set when the model has control flow (``If``/``Loop``): the MACs
    then count the main graph only, and how much of the rest runs depends on the data.
    """
    cost = model_cost(infer_shapes(onnxopt.load(path)))
    control_flow = any(cost.op_histogram.get(op) for op in ("If", "Loop", "Scan"))
    return {"params": cost.params, "macs": cost.macs, "file_bytes": file_size(path),
            "nodes": cost.nodes, "main_graph_only": control_flow}


def expected_macs(report: dict[str, Any] | None) -> float | None:
    """Data-dependent MACs per sample a pass reported (``expected_macs`` in its stats)."""
    def find(obj: Any) -> float | None:
        if isinstance(obj, dict):
            if isinstance(obj.get("expected_macs"), (int, float)):
                return float(obj["expected_macs"])
            return next((v for v in map(find, obj.values()) if v is not None), None)
        return None
    if not report:
        return None
    return next((v for v in (find(p.get("stats")) for p in reversed(report["passes"])
                             if p["status"] == "kept") if v is not None), None)


def predict(session: ort.InferenceSession, inputs: dict[str, np.ndarray],
            batch: int = 32) -> np.ndarray:
    """First output of ``session`` over all samples, in batches."""
    n = len(next(iter(inputs.values())))
    names = [i.name for i in session.get_inputs()]
    parts = [session.run(None, {k: inputs[k][s:s + batch] for k in names})[0]
             for s in range(0, n, batch)]
    return np.concatenate(parts, axis=0)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference`` in dB
    (None when the outputs are identical)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((actual.astype(np.float64) - ref) ** 2))
    return None if noise == 0.0 else float(10 * np.log10(float(np.sum(ref**2)) / noise))


def _random_npz(path: Path, model_path: Path, n: int, seed: int) -> Path:
    """Standard-normal samples for every model input, shaped from the model (batch axis n)."""
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    rng = np.random.default_rng(seed)
    arrays = {}
    for inp in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 1
                for d in inp.type.tensor_type.shape.dim]
        arrays[inp.name] = rng.standard_normal((n, *dims[1:]), dtype=np.float32)
    np.savez(path, **arrays)
    return path


def _load_inputs(npz: Path, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(npz) as data:
        labels = np.asarray(data["labels"]).reshape(-1) if "labels" in data else None
        return {k: np.asarray(data[k]) for k in names}, labels


def _static_batch(model_path: Path) -> int | None:
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


# -- orchestration --------------------------------------------------------------------------


class Progress:
    """One line per step on stderr, with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - self.start:7.1f}s] {text}\n")
        sys.stderr.flush()


def pass_names(spec: str) -> list[str]:
    """Pass names of a spec (options in parentheses dropped)."""
    return [m.group(1) for m in re.finditer(r"([A-Za-z_][\w\-]*)\s*(?:\([^)]*\))?", spec)]


def plan_pipelines(quick: bool) -> tuple[list[PipelineEntry], list[dict[str, str]]]:
    """The entries to run now, and the skipped ones with the reason."""
    registered = onnxopt.registered_passes()
    run, skipped = [], []
    for entry in PIPELINES:
        missing = [n for n in pass_names(entry.spec) if n not in registered]
        if missing:
            reason = f"pass {', '.join(repr(n) for n in missing)} not registered yet"
        elif quick and entry.full_only:
            reason = "full run only"
        else:
            try:
                onnxopt.parse_pipeline(entry.spec)
                reason = ""
            except onnxopt.PipelineError as exc:
                reason = f"spec does not parse: {exc}"
        if reason:
            skipped.append({"label": entry.label, "spec": entry.spec, "reason": reason})
        else:
            run.append(entry)
    return run, skipped


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
    eval_npz = entry.labelled or _random_npz(folder / "eval.npz", original, n_eval, seed=1)
    calib_npz = entry.calib or _random_npz(folder / "calib.npz", original, n_calib, seed=2)

    rows: list[dict[str, Any]] = [{"label": "original", "kind": "original", "spec": "",
                                   "path": original, "status": "ok", "latency_wanted": True}]
    for p in pipelines:
        if p.labelled_only and entry.labelled is None:
            continue
        log(f"{entry.name}: onnxopt {p.spec}")
        out = folder / f"opt_{len(rows)}.onnx"
        res = run_job({"kind": "onnxopt", "model": os.fspath(original), "spec": p.spec,
                       "calib": os.fspath(calib_npz) if p.needs_calib else None,
                       "eval": os.fspath(eval_npz), "output": os.fspath(out)}, args.timeout)
        rows.append(_row(p.label, "onnxopt", p.spec, p.group, out, res, p.latency, log))
    for peer in peers.PEERS:
        if not peer.available():
            rows.append({"label": peer.label, "kind": "peer", "spec": "", "status":
                         f"skipped: {peer.module} is not installed", "path": None})
            log(f"{entry.name}: peer {peer.label} skipped ({peer.module} not installed)")
            continue
        log(f"{entry.name}: peer {peer.label}")
        out = folder / f"peer_{len(rows)}.onnx"
        res = run_job({"kind": "peer", "peer": peer.label, "model": os.fspath(original),
                       "calib": os.fspath(calib_npz), "output": os.fspath(out)}, args.timeout)
        rows.append(_row(peer.label, "peer", "", "peer", out, res, True, log))

    log(f"{entry.name}: size, MACs, accuracy and agreement on {eval_npz.name}")
    base_session = latency.bench_session(os.fspath(original))
    names = [i.name for i in base_session.get_inputs()]
    inputs, labels = _load_inputs(eval_npz, names)
    ref_logits = predict(base_session, inputs)
    reference = ref_logits.argmax(1)
    sessions: dict[str, ort.InferenceSession] = {}
    for row in rows:
        if row.get("path") is None or row["status"].startswith(("error", "skipped")):
            continue
        row.update(measure_cost(row["path"]))
        if row["main_graph_only"]:
            row["expected_macs"] = expected_macs(row.get("report"))
        session = base_session if row["kind"] == "original" else latency.bench_session(
            os.fspath(row["path"]))
        logits = predict(session, inputs)
        top1 = logits.argmax(1)
        row["agreement"] = float(np.mean(top1 == reference))
        row["sqnr_db"] = sqnr_db(ref_logits, logits)
        row["accuracy"] = None if labels is None else float(np.mean(top1 == labels))
        if row.get("latency_wanted"):
            sessions[row["label"]] = session
            if row["kind"] == "original":  # an A/A pair shows the noise floor
                twin = latency.bench_session(os.fspath(original))
                predict(twin, inputs)  # the same history as every other session
                sessions["original (A/A)"] = twin
    base = rows[0]
    for row in rows:
        for key in ("params", "macs", "file_bytes"):
            if key in row:
                row[f"{key}_ratio"] = row[key] / base[key] if base[key] else None

    static = _static_batch(original)
    lat: dict[int, dict[str, Any]] = {}
    for batch in args.batches:
        if static is not None and static != batch:
            log(f"{entry.name}: batch {batch} skipped (input batch is fixed at {static})")
            continue
        feed = {k: _take(v, batch) for k, v in inputs.items()}
        log(f"{entry.name}: latency batch {batch}, {len(sessions)} sessions x "
            f"{args.rounds} interleaved rounds")
        lat[batch] = latency.measure(
            sessions, feed, "original", rounds=args.rounds,
            warmup_seconds=0.15 if args.quick else 0.3,
            sample_seconds=0.002 if args.quick else 0.004)
    aa = {str(b): s["original (A/A)"].to_dict() for b, s in lat.items() if "original (A/A)" in s}
    for row in rows:
        row["latency"] = {str(b): s[row["label"]].to_dict() for b, s in lat.items()
                          if row["label"] in s}
        row["path"] = None if row.get("path") is None else os.fspath(row["path"])
        row.pop("latency_wanted", None)
    return {"name": entry.name, "description": entry.description,
            "labelled": labels is not None, "eval_samples": len(reference),
            "original_classes": int(len(np.unique(reference))),
            "eval_data": eval_npz.name if entry.labelled else f"random normal ({len(reference)})",
            "calib_data": calib_npz.name if entry.calib else f"random normal ({n_calib})",
            "rows": rows, "aa": aa}


def _take(array: np.ndarray, batch: int) -> np.ndarray:
    reps = math.ceil(batch / len(array))
    return np.concatenate([array] * reps, axis=0)[:batch] if reps > 1 else array[:batch]


def _row(label: str, kind: str, spec: str, group: str, out: Path, res: dict[str, Any],
         want_latency: bool, log: Progress) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label, "kind": kind, "spec": spec, "group": group,
                           "latency_wanted": want_latency}
    if not res.get("ok") or not out.exists():
        row.update(status=f"error: {res.get('error', 'no output written')}", path=None,
                   traceback=res.get("traceback", ""))
        log(f"  -> {row['status']}")
        return row
    row.update(status=res["status"], path=out, note=res.get("note", ""),
               optimizer={k: res.get(k) for k in ("wall_s", "passes_s", "peak_rss_mb",
                                                  "rss_before_mb", "memory_method")},
               report=res.get("report"))
    log(f"  -> {row['status']}, {res['wall_s']:.2f}s, peak +{res['peak_rss_mb']:.0f} MB")
    return row


def main(argv: list[str] | None = None) -> int:
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
    log = Progress()

    models = _models()
    if args.models:
        wanted = args.models.split(",")
        unknown = set(wanted) - {m.name for m in models}
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}; choose from "
                         f"{[m.name for m in models]}")
        models = [m for m in models if m.name in wanted]
    elif args.quick:
        models = [m for m in models if not m.full_only]
    pipelines, skipped = plan_pipelines(args.quick)
    if args.pipelines:
        wanted = args.pipelines.split(",")
        unknown = set(wanted) - {p.label for p in PIPELINES}
        if unknown:
            parser.error(f"unknown pipeline(s) {sorted(unknown)}; choose from "
                         f"{[p.label for p in PIPELINES]}")
        skipped += [{"label": p.label, "spec": p.spec, "reason": "not selected (--pipelines)"}
                    for p in pipelines if p.label not in wanted]
        pipelines = [p for p in pipelines if p.label in wanted]
    log(f"registered passes: {', '.join(onnxopt.registered_passes())}; running "
        f"{len(pipelines)} pipelines, skipping {len(skipped)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "config": {"quick": args.quick, "rounds": args.rounds, "batches": args.batches,
                   "warmup_s": 0.15 if args.quick else 0.3,
                   "min_sample_s": 0.002 if args.quick else 0.004,
                   "threads": latency.THREADS, "command": " ".join(sys.argv)},
        "skipped_pipelines": skipped, "models": []}
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        for entry in models:
            result = bench_model(entry, pipelines, args, Path(tmp), log)
            if result is None:
                continue
            results["models"].append(result)
            _write(results, args.out, log)
        if args.keep_models:
            shutil.copytree(tmp, args.out / "models", dirs_exist_ok=True)
    results["config"]["seconds"] = time.perf_counter() - log.start
    results["machine"]["load_average_end"] = _load_average()
    _write(results, args.out, log, final=True)
    log(f"done in {results['config']['seconds']:.0f}s; wrote {args.out}")
    return 0


def _write(results: dict[str, Any], out: Path, log: Progress, final: bool = False) -> None:
    import plot

    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str,
                                                allow_nan=False) + "\n")
    write_markdown(results, out / "latest.md")
    if final:
        plot.accuracy_vs_macs(results, out / "accuracy_vs_macs.png")
        log(f"wrote {out / 'latest.md'}, latest.json, accuracy_vs_macs.png")


# -- latest.md ------------------------------------------------------------------------------


def _num(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


def _with_ratio(row: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    if key not in row:
        return ""
    if row["kind"] == "original":
        return fmt(row[key])
    return f"{fmt(row[key])} ({row[f'{key}_ratio']:.3f}x)"


def _latency_cell(row: dict[str, Any], batch: str) -> str:
    stats = row.get("latency", {}).get(batch)
    if not stats:
        return ""
    if row["kind"] == "original":
        return f"1 ({stats['median_ms']:.2f} ms)"
    return f"{stats['ratio']:.2f}x [{stats['ratio_q1']:.2f}-{stats['ratio_q3']:.2f}]"


def markdown_table(model: dict[str, Any], batches: list[int]) -> list[str]:
    """The results table of one model, one row per variant."""
    head = ["variant", "pipeline", "status", "params", "MACs", "size", "top-1", "agree",
            "SQNR", *(f"latency b{b}" for b in batches), "opt time", "opt peak mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
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
                         f"({row['expected_macs'] / model['rows'][0]['macs']:.3f}x)")
        cells = [row["label"], spec, row["status"],
                 _with_ratio(row, "params", _num), macs,
                 _with_ratio(row, "file_bytes", _size),
                 "" if row.get("accuracy") is None else f"{100 * row['accuracy']:.2f}%",
                 "" if row.get("agreement") is None else f"{row['agreement']:.3f}",
                 "" if "agreement" not in row or row["kind"] == "original" else (
                     "identical" if row.get("sqnr_db") is None else f"{row['sqnr_db']:.1f} dB"),
                 *(_latency_cell(row, str(b)) for b in batches),
                 "" if opt.get("wall_s") is None else f"{opt['wall_s']:.2f} s",
                 "" if opt.get("peak_rss_mb") is None else f"+{opt['peak_rss_mb']:.0f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
        if row["kind"] == "original" and aa:
            cells = ["original (A/A)", "same file, second session", "noise floor", "", "", "",
                     "", "", "", *(("" if str(b) not in aa else
                                f"{aa[str(b)]['ratio']:.2f}x [{aa[str(b)]['ratio_q1']:.2f}-"
                                f"{aa[str(b)]['ratio_q3']:.2f}]") for b in batches), "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline_table(model: dict[str, Any], batches: list[int]) -> list[str]:
    """A short table of a labelled model, for the project README."""
    head = ["variant", "MACs", "size", "top-1", *(f"latency b{b}" for b in batches)]
    lines = [f"## Headline: {model['name']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in model["rows"]:
        if "macs" not in row:
            continue
        macs = f"{row['expected_macs'] / model['rows'][0]['macs']:.2f}x expected" if row.get(
            "expected_macs") else f"{row['macs_ratio']:.2f}x"
        cells = [row["label"] if row["kind"] != "peer" else f"peer: {row['label']}",
                 "1" if row["kind"] == "original" else macs,
                 _size(row["file_bytes"]) if row["kind"] == "original"
                 else f"{row['file_bytes_ratio']:.2f}x",
                 "" if row.get("accuracy") is None else f"{100 * row['accuracy']:.2f}%",
                 *(_latency_cell(row, str(b)) for b in batches)]
        lines.append("| " + " | ".join(cells) + " |")
        aa = model.get("aa", {})
        if row["kind"] == "original" and aa:
            lines.append("| original (A/A): noise floor | | | | " + " | ".join(
                "" if str(b) not in aa else f"{aa[str(b)]['ratio']:.2f}x "
                f"[{aa[str(b)]['ratio_q1']:.2f}-{aa[str(b)]['ratio_q3']:.2f}]"
                for b in batches) + " |")
    return [*lines, ""]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Render ``latest.md``: machine header, method, one table per model, skipped rows."""
    m, cfg = results["machine"], results["config"]
    vnni = f"yes ({', '.join(m['vnni_flags'])})" if m["vnni"] else "no"
    mem = next((r["optimizer"]["memory_method"] for model in results["models"]
                for r in model["rows"] if r.get("optimizer")), "n/a")
    lines = [
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
        "- MACs per sample from `onnxopt.analysis.cost` (Q/DQ nodes count as elementwise; "
        "with control flow only the main graph is counted, and a pass's own expected MACs on "
        "calibration data are shown); size = bytes on disk; agree = top-1 agreement with the "
        "original on the eval data; SQNR = output signal-to-noise ratio against the "
        "original's logits",
        "",
    ]
    for model in results["models"]:
        if model["labelled"]:
            lines += headline_table(model, cfg["batches"])
    for model in results["models"]:
        lines += [f"## {model['name']}", "",
                  f"{model['description']}. Eval: {model['eval_data']}; calibration: "
                  f"{model['calib_data']}. Distinct classes the original predicts on the eval "
                  f"data: {model['original_classes']}"
                  + ("" if model["original_classes"] > 2 else
                     " (so top-1 agreement says little here; see SQNR)") + ".", ""]
        lines += markdown_table(model, cfg["batches"])
        notes = [f"- {r['label']}: {r['note']}" for r in model["rows"] if r.get("note")]
        lines += ["", *notes, ""] if notes else [""]
    if results["skipped_pipelines"]:
        lines += ["## Not run", ""]
        lines += [f"- {s['label']} (`{s['spec']}`): {s['reason']}"
                  for s in results["skipped_pipelines"]]
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
