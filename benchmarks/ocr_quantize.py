"""int8 on the PP-OCR models judged by the task's own answer: ours vs quantize_static vs fp32.

Usage, from the repository root (inputs from ``benchmarks/corpus/ocr_task.py``)::

    python benchmarks/corpus/ocr_task.py MODELS/rec.onnx DATA
    python benchmarks/ocr_quantize.py MODELS DATA WORK [--tasks rec,cls,det] [--rounds 20]

For each of rec, cls and det: the model is upgraded to opset 13 when older
(``onnx.version_converter``; per-channel weights need it), then quantized by

* ``ours``: ``onnxopt.optimize(model, "cleanup,quantize", calib=..., eval=...)``, defaults;
* ``ours target``: the same with ``quantize(target=T)``, the pass's accuracy-aware fallback;
* ``ours task-excl k``: ``quantize(exclude_nodes=...)`` with the ``k`` nodes the fallback ranks
  most sensitive kept float, ``k`` grown until the task agreement on the *calibration* set
  reaches T (the task-judged fallback the pass does not have; rec only, see the results);
* ``peer``: onnxruntime ``quantize_static`` QDQ, per-channel, U8 activations, S8 weights,
  MinMax, after ``quant_pre_process`` (``peers.py``), on the same calibration file.

Reported per model: task agreement with the fp32 model on the evaluation set (rec: exact
string and character accuracy of the CTC-decoded text; det: pages whose boxes all match
one-to-one at IoU >= 0.5, and box recall; cls: same angle). For rec also: the same text
up to leading/trailing spaces, and whole per-step argmax paths equal (what a sequence-aware
score inside the pass could compute without knowing the decoder). Also per row: the integer
kernels in onnxruntime's optimized graph, and batch-1 latency ratios to fp32 (``latency.measure``:
warmed up, interleaved, median of paired ratios, 2 intra-op threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE / "corpus"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import latency  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import ocr_task  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import peers  # noqa: E402
from onnx import version_converter  # noqa: E402

import onnxopt  # noqa: E402

PEER = "ort QDQ per-channel U8S8"
MODELS = {"rec": "*PP-OCRv4_rec*.onnx", "cls": "*cls*.onnx", "det": "*PP-OCRv4_det*.onnx"}
SHAPES = {"rec": (1, 3, ocr_task.REC_HEIGHT, ocr_task.REC_WIDTH),
          "cls": (1, 3, ocr_task.CLS_HEIGHT, ocr_task.CLS_WIDTH),
          "det": (1, 3, ocr_task.DET_SIZE, ocr_task.DET_SIZE)}
INT_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QGemm", "QLinearMatMul",
           "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul",
           "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearAveragePool",
           "QLinearLeakyRelu", "QLinearSoftmax")
FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul",
             "NhwcFusedConv")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def upgrade(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` at opset >= 13 (metadata kept); returns the source opset."""
    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        upgraded = version_converter.convert_version(model, 13)
        del upgraded.metadata_props[:]
        upgraded.metadata_props.extend(model.metadata_props)
        model = upgraded
    onnx.save(model, str(dst))
    return opset


def run_all(path: Path, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """First output of ``path`` over ``x`` in batches (default CPU session)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def kernels(path: Path, work: Path) -> dict[str, int]:
    """Op counts of onnxruntime's optimized graph (integer kernels and float compute ops)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(work / f"{path.stem}.ortopt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {op: counts[op] for op in (*INT_OPS, *FLOAT_OPS) if counts[op]}


class Task:
    """The task's answer for one model's outputs, and agreement with the fp32 answers."""

    def __init__(self, name: str, chars: list[str]) -> None:
        self.name, self.chars = name, chars

    def answers(self, out: np.ndarray) -> list:
        if self.name == "rec":
            return ocr_task.ctc_decode(out, self.chars)
        if self.name == "cls":
            return [int(v) for v in out.argmax(1)]
        return [ocr_task.det_boxes(p[0]) for p in out]

    def agreement(self, got: list, want: list) -> dict[str, float]:
        same = float(np.mean([g == w for g, w in zip(got, want, strict=True)]))
        if self.name == "rec":
            stripped = float(np.mean([g.strip() == w.strip()
                                      for g, w in zip(got, want, strict=True)]))
            return {"agree": same, "agree_stripped": stripped,
                    "char_acc": ocr_task.char_accuracy(got, want)}
        if self.name == "det":
            pages = [ocr_task.match_boxes(g, w) == len(w) == len(g)
                     for g, w in zip(got, want, strict=True)]
            found = sum(ocr_task.match_boxes(g, w) for g, w in zip(got, want, strict=True))
            return {"agree": float(np.mean(pages)),
                    "box_recall": found / max(1, sum(len(w) for w in want))}
        return {"agree": same}


def ours(src: Path, dst: Path, spec: str, calib: Path, evalset: Path,
         shape: tuple[int, ...], validate: bool = True) -> dict:
    """Run our pipeline; returns wall time, pass status and the quantize pass's stats.

    The result is cached beside ``dst`` (``.json``) and reused when the spec is the same.
    """
    cache = dst.with_suffix(".json")
    if cache.exists() and dst.exists():
        cached = json.loads(cache.read_text())
        if cached.get("spec") == spec:
            return cached
    start = time.perf_counter()
    model, report = onnxopt.optimize(str(src), spec, calib=str(calib), eval=str(evalset),
                                     input_shapes={"x": shape}, validate=validate)
    seconds = time.perf_counter() - start
    onnxopt.save(model, str(dst))
    rec = next(r for r in report.records if r.name.startswith("quantize"))
    info = {"spec": spec, "seconds": seconds, "status": str(rec.status.value),
            "message": rec.message, "stats": _jsonable(rec.stats)}
    cache.write_text(json.dumps(info))
    return info


def task_excluded(src: Path, work: Path, task: Task, calib: Path, evalset: Path,
                  ranking: list[str], target: float, want_calib: list,
                  shape: tuple[int, ...], ks: tuple[int, ...], tag: str) -> list[dict]:
    """Keep the ``k`` top-ranked nodes float by name, ``k`` doubling from 2 until the
    calibration set's task agreement reaches ``target`` (``ks``: the ``k`` to try, in order);
    returns one row per ``k`` tried."""
    rows = []
    xc = np.load(calib)["x"]
    for k in ks:
        if k > len(ranking):
            break
        names = ranking[:k]
        dst = work / f"{task.name}_{tag}excl{k}.onnx"
        spec = f"cleanup,quantize(exclude_nodes={';'.join(names)},report_sqnr=false)"
        # not validated by optimize: the task agreement measured here is the judgement
        info = ours(src, dst, spec, calib, evalset, shape, validate=False)
        got = task.answers(run_all(dst, xc))
        calib_agree = task.agreement(got, want_calib)["agree"]
        _log(f"  {task.name} exclude {tag} top-{k}: calib agreement {calib_agree:.3f} "
             f"({info['status']})")
        rows.append({"k": k, "nodes": names, "path": dst, "calib_agree": calib_agree, **info})
        if calib_agree >= target:
            break
    return rows


def _ranking(stats: dict, cleaned: onnx.ModelProto) -> list[str]:
    """Node names by the fallback's sensitivity (output SQNR with that node alone int8)."""
    trace = stats.get("fallback", {})
    sens = trace.get("sensitivity_sqnr_db", {})
    nodes = list(cleaned.graph.node)
    return [nodes[int(i)].name for i in sens if nodes[int(i)].name]


def bench_task(name: str, models: Path, data: Path, work: Path, target: float,
               rounds: int, task_fallback: bool, skip_target: bool = False,
               ks: tuple[int, ...] = (2, 4, 8, 16, 32)) -> dict:
    src = next(iter(sorted(models.glob(MODELS[name]))))
    fp32 = work / f"{name}_fp32.onnx"
    opset = upgrade(src, fp32)
    calib, evalset = data / f"{name}_calib.npz", data / f"{name}_eval.npz"
    task = Task(name, ocr_task.characters(fp32) if name == "rec" else [])
    shape = SHAPES[name]
    variants: dict[str, dict] = {"fp32": {"path": fp32}}
    _log(f"{name}: opset {opset} -> 13; ours (defaults)")
    variants["ours"] = {"path": work / f"{name}_ours.onnx"}
    variants["ours"].update(ours(fp32, variants["ours"]["path"], "cleanup,quantize", calib,
                                 evalset, shape))
    key = f"ours target={target}"
    if not skip_target:
        _log(f"{name}: ours target={target}")
        variants[key] = {"path": work / f"{name}_target.onnx"}
        variants[key].update(ours(fp32, variants[key]["path"],
                                  f"cleanup,quantize(target={target})", calib, evalset, shape))
    _log(f"{name}: peer")
    variants["peer"] = {"path": work / f"{name}_peer.onnx"}
    peer_cache = work / f"{name}_peer.json"
    if peer_cache.exists() and variants["peer"]["path"].exists():
        variants["peer"].update(json.loads(peer_cache.read_text()))
    else:
        peers.get_peer(PEER).import_modules()
        start = time.perf_counter()
        note = peers.run_peer(PEER, fp32, variants["peer"]["path"], calib)
        info = {"note": note, "seconds": time.perf_counter() - start}
        peer_cache.write_text(json.dumps(info))
        variants["peer"].update(info)

    xe, xc = np.load(evalset)["x"], np.load(calib)["x"]
    ref = run_all(fp32, xe)
    want = task.answers(ref)
    excl_rows: list[dict] = []
    if task_fallback:
        if skip_target:  # rank by the per-node SQNR of the all-int8 model (its report)
            tag = "sqnr"
            ranking = [label.split("'")[1] for label in
                       variants["ours"]["stats"].get("node_sqnr_db", {}) if "'" in label]
        else:  # rank by the fallback's sensitivity (output SQNR with one node int8)
            tag = ""
            cleaned, _ = onnxopt.optimize(str(fp32), "cleanup", validate=False)
            ranking = _ranking(variants[key]["stats"], _proto(cleaned, work))
        _log(f"{name}: task-judged exclusions over {len(ranking)} ranked nodes")
        if ranking:
            want_calib = task.answers(run_all(fp32, xc))
            excl_rows = task_excluded(fp32, work, task, calib, evalset, ranking, target,
                                      want_calib, shape, ks, tag)
            for row in excl_rows:
                variants[f"ours {tag}-ranked excl {row['k']}"] = row
    for label, v in variants.items():
        out = run_all(v["path"], xe)
        v["task"] = task.agreement(task.answers(out), want)
        if out.ndim == 3:  # what a sequence-aware fallback could score: whole argmax paths
            v["task"]["argmax_path"] = float(np.mean(
                np.all(out.argmax(-1) == ref.argmax(-1), axis=1)))
        v["kernels"] = kernels(v["path"], work)
        _log(f"  {label}: {v['task']} {v['kernels']}")
    x1 = xe[:1]
    sessions = {label: latency.bench_session(str(v["path"])) for label, v in variants.items()}
    sessions["fp32 (A/A)"] = latency.bench_session(str(fp32))  # the run's noise floor
    variants["fp32 (A/A)"] = {"path": fp32, "task": variants["fp32"]["task"],
                              "kernels": variants["fp32"]["kernels"]}
    for label, st in latency.measure(sessions, {"x": x1}, "fp32", rounds=rounds).items():
        variants[label]["latency"] = st.to_dict()
    return {"model": src.name, "opset": opset, "n_eval": len(xe), "n_calib": len(xc),
            "variants": variants}


def _proto(model: object, work: Path) -> onnx.ModelProto:
    path = work / "cleaned.onnx"
    onnxopt.save(model, str(path))
    return onnx.load(str(path))


def _fmt_task(t: dict) -> str:
    extra = [f"{k} {v:.3f}" for k, v in t.items() if k != "agree"]
    return f"{t['agree']:.3f}" + (f" ({', '.join(extra)})" if extra else "")


def table(results: dict[str, dict], target: float) -> str:
    lines = ["| model | variant | task agreement vs fp32 | integer kernels (ORT graph) | "
             "float Conv/MatMul left | latency / fp32 (b=1) | quantize s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for label, v in res["variants"].items():
            k = v.get("kernels", {})
            ints = ", ".join(f"{op} {n}" for op, n in k.items() if op in INT_OPS) or "-"
            flo = ", ".join(f"{op} {n}" for op, n in k.items() if op in FLOAT_OPS) or "-"
            lat = v.get("latency", {})
            ratio = (f"{lat['ratio']:.2f} [{lat['ratio_q1']:.2f}-{lat['ratio_q3']:.2f}]"
                     if lat else "-")
            secs = f"{v['seconds']:.0f}" if v.get("seconds") is not None else "-"
            lines.append(f"| {name} | {label} | {_fmt_task(v['task'])} | {ints} | {flo} | "
                         f"{ratio} | {secs} | {v.get('status', '')} |")
    return "\n".join(lines)


def _jsonable(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return obj.name
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


def details(results: dict[str, dict]) -> str:
    """What the pass's fallback did and what the task-judged exclusions kept float."""
    out = []
    for name, res in results.items():
        out.append(f"\n### {name}: {res['model']} (opset {res['opset']} -> 13), "
                   f"{res['n_calib']} calibration / {res['n_eval']} evaluation samples\n")
        for label, v in res["variants"].items():
            stats = v.get("stats") or {}
            trace = stats.get("fallback")
            if trace:
                out.append(f"- {label}: the pass's fallback scored the all-int8 model "
                           f"{trace.get('score_all_quantized', float('nan')):.4f} against "
                           f"target {trace.get('target')}; scores with k float nodes: "
                           f"{[round(x, 4) for x in trace.get('scores', [])]}; reached: "
                           f"{trace.get('reached', 'n/a (met without fallback)')}; kept float: "
                           f"{stats.get('kept_float') or 'none'}")
            if "nodes" in v:
                out.append(f"- {label}: kept float {v['nodes']}; calibration-set task "
                           f"agreement {v['calib_agree']:.3f}; evaluation {_fmt_task(v['task'])}")
            if v.get("note"):
                out.append(f"- {label}: {v['note']}")
    return "\n".join(out)


def markdown(results: dict[str, dict], target: float, info: dict) -> str:
    head = (f"# int8 on the PP-OCR models, judged by the task's own answer\n\n"
            f"Generated by `benchmarks/ocr_quantize.py` on {info['date']}: {info['cpu']} "
            f"(VNNI: {info['vnni']}), {info['usable_cpus']} usable CPUs, load average at start "
            f"{info['load_average_start']}, at end {machine.load_average()}; onnxruntime "
            f"{info['onnxruntime']}, onnx {info['onnx']}. Inputs from "
            f"`benchmarks/corpus/ocr_task.py` (rendered text, rapidocr preprocessing). "
            f"Task agreement is with the fp32 model's own answer on the evaluation set; "
            f"latency is batch 1, 2 intra-op threads, median of interleaved paired ratios "
            f"[quartiles]. Fallback target {target}.\n\n")
    return head + table(results, target) + "\n" + details(results) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--tasks", default="rec,cls,det")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-task-fallback", action="store_true")
    parser.add_argument("--skip-target", action="store_true",
                        help="no target= run; exclusions ranked by the all-int8 node SQNR")
    parser.add_argument("--excl-k", default="2,4,8,16,32",
                        help="how many ranked nodes to keep float, tried in order")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown results file")
    parser.add_argument("--from-json", type=Path, nargs="*", default=None,
                        help="only rewrite --out from earlier --json files (no runs)")
    args = parser.parse_args(argv)
    info = machine.machine_info()
    if args.from_json:
        merged = {k: v for p in args.from_json for k, v in json.loads(p.read_text()).items()}
        args.out.write_text(markdown(merged, args.target, info))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    runner: Callable[..., dict] = bench_task
    for name in args.tasks.split(","):
        results[name] = runner(name, args.models, args.data, args.work, args.target,
                               args.rounds, not args.no_task_fallback, args.skip_target,
                               tuple(int(k) for k in args.excl_k.split(",")))
        print(table({name: results[name]}, args.target), flush=True)
        if args.json:
            args.json.write_text(json.dumps(_jsonable(results), indent=1))
        if args.out:
            args.out.write_text(markdown(results, args.target, info))
    print(table(results, args.target))
    if args.out:
        args.out.write_text(markdown(results, args.target, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
