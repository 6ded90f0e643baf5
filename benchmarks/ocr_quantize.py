"""int8 on the PP-OCR models judged by the task's own answer: ours vs quantize_static vs fp32.

Usage, from the repository root (inputs from ``benchmarks/corpus/ocr_task.py``)::

    python benchmarks/corpus/ocr_task.py MODELS/rec.onnx DATA
    python benchmarks/ocr_quantize.py MODELS DATA WORK [--tasks rec,cls,det] [--rounds 20]

For each of rec, cls and det: the model is upgraded to opset 13 when older
(``onnx.version_converter``; per-channel weights need it), then quantized by

* ``ours``: ``onnxopt.optimize(model, "cleanup,fold-bn,quantize", calib=..., eval=...)``,
  defaults: the pass scores its int8 model against the quality floor on the calibration
  samples and keeps its most sensitive nodes float until it clears it, or quantizes nothing;
* ``ours fallback=false``: the all-int8 model the fallback started from (not validated);
* ``peer``: onnxruntime ``quantize_static`` QDQ, per-channel, U8 activations, S8 weights,
  MinMax, after ``quant_pre_process`` (``peers.py``), on the same calibration file.

* rec only, ``ours Conv/MatMul only``: ``quantize(fallback=false)`` with the elementwise
  ops excluded (static int8 into every Conv and MatMul and nothing else), the best static
  model found by hand.
* rec only, ``ours static Conv + dynamic MatMul``: the start of the fallback's stage with
  the MatMuls dynamic: every Conv static int8, the 9 MatMuls with a constant weight dynamic
  int8, the elementwise ops and the 4 attention MatMuls float; and the same without the
  activation-range equalization (``equalize_activations=false``), to show what it does.

Reported per model: task agreement with the fp32 model on the evaluation set (rec: exact
string and character accuracy of the CTC-decoded text; det: pages whose boxes all match
one-to-one at IoU >= 0.5, and box recall; cls: same angle). For rec, a second table splits
the text agreement by fp32's own confidence (per sample, the smallest top-1 minus top-2
probability over the time steps) and gives each variant's accuracy against the rendered
text (``rec_eval_meta.json``), with an ``fp32, input +-1 gray level`` row: fp32 on the
evaluation crops plus uniform noise of one 8-bit gray level, the change any perturbation of
that size makes. For rec also: the same text
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
#: fp32 confidence bands of the rec strata table (smallest top-1 minus top-2 probability).
MARGIN_BANDS = {"< 0.1": (0.0, 0.1), "0.1-0.3": (0.1, 0.3), ">= 0.3": (0.3, 2.0)}
#: The ops between the recognizer's Conv/MatMul layers (learnable affine, hardswish, SE).
REC_ELEMENTWISE = ("Add", "Mul", "Sigmoid", "GlobalAveragePool", "Concat", "AveragePool")
#: The recognizer's four MatMuls of two activations (attention scores and their values).
REC_ATTENTION = ("p2o.MatMul.2", "p2o.MatMul.4", "p2o.MatMul.14", "p2o.MatMul.16")
#: Float compute ops of onnxruntime's optimized graph (FusedGemm: a Gemm with its activation).
FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul",
             "NhwcFusedConv", "FusedGemm")


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


def bench_task(name: str, models: Path, data: Path, work: Path, rounds: int) -> dict:
    src = next(iter(sorted(models.glob(MODELS[name]))))
    fp32 = work / f"{name}_fp32.onnx"
    opset = upgrade(src, fp32)
    calib, evalset = data / f"{name}_calib.npz", data / f"{name}_eval.npz"
    task = Task(name, ocr_task.characters(fp32) if name == "rec" else [])
    shape = SHAPES[name]
    variants: dict[str, dict] = {"fp32": {"path": fp32}}
    runs = [("ours", "cleanup,fold-bn,quantize", True),
            ("ours fallback=false", "cleanup,fold-bn,quantize(fallback=false)", False)]
    if name == "rec":
        runs.append(("ours Conv/MatMul only", "cleanup,fold-bn,quantize(fallback=false,"
                     f"exclude_ops={';'.join(REC_ELEMENTWISE)})", False))
        static_dynamic = ("fallback=false,dynamic_matmul=true,exclude_ops="
                          f"{';'.join(REC_ELEMENTWISE)},exclude_nodes={';'.join(REC_ATTENTION)}")
        runs.append(("ours static Conv + dynamic MatMul",
                     f"cleanup,fold-bn,quantize({static_dynamic})", False))
        runs.append(("ours static Conv + dynamic MatMul, equalize_activations=false",
                     f"cleanup,fold-bn,quantize({static_dynamic},equalize_activations=false)",
                     False))
    for label, spec, validate in runs:
        _log(f"{name}: {label}")
        path = work / f"{name}_{label.replace(' ', '_').replace('=', '').replace('/', '_')}.onnx"
        variants[label] = {"path": path}
        variants[label].update(ours(fp32, path, spec, calib, evalset, shape, validate))
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
    for label, v in variants.items():
        out = run_all(v["path"], xe)
        v["task"] = task.agreement(task.answers(out), want)
        if out.ndim == 3:  # what the pass scores: whole per-step argmax paths
            v["task"]["argmax_path"] = float(np.mean(
                np.all(out.argmax(-1) == ref.argmax(-1), axis=1)))
        v["kernels"] = kernels(v["path"], work)
        if name == "rec":
            v["strata"] = rec_strata(out, ref, data, task.chars)
        _log(f"  {label}: {v['task']} {v['kernels']} {v.get('strata', '')}")
    if name == "rec":
        noisy = xe + _gray_level_noise(xe)
        variants["fp32, input +-1 gray level"] = {"strata": rec_strata(
            run_all(fp32, noisy), ref, data, task.chars)}
    x1 = xe[:1]
    sessions = {label: latency.bench_session(str(v["path"])) for label, v in variants.items()
                if "path" in v}
    sessions["fp32 (A/A)"] = latency.bench_session(str(fp32))  # the run's noise floor
    variants["fp32 (A/A)"] = {"path": fp32, "task": variants["fp32"]["task"],
                              "kernels": variants["fp32"]["kernels"]}
    for label, st in latency.measure(sessions, {"x": x1}, "fp32", rounds=rounds).items():
        variants[label]["latency"] = st.to_dict()
    return {"model": src.name, "opset": opset, "n_eval": len(xe), "n_calib": len(xc),
            "variants": variants}


def _gray_level_noise(x: np.ndarray, levels: float = 1.0, seed: int = 0) -> np.ndarray:
    """Uniform noise of +-``levels`` 8-bit gray levels in the normalized units, zero on the
    zero padding (``(p / 255 - 0.5) / 0.5``: one level is 2/255)."""
    rng = np.random.default_rng(seed)
    inked = (x != 0).any(axis=1, keepdims=True)
    return (rng.uniform(-levels, levels, x.shape) * (2 / 255) * inked).astype(np.float32)


def rec_strata(out: np.ndarray, ref: np.ndarray, data: Path, chars: list[str]) -> dict:
    """Text agreement with fp32 split by fp32's confidence, and accuracy against the truth.

    fp32's confidence in a sample is its smallest top-1 minus top-2 probability over the
    time steps (a near tie anywhere can change the text).
    """
    top = np.sort(ref, axis=-1)
    margin = (top[..., -1] - top[..., -2]).min(axis=1)
    want, got = ocr_task.ctc_decode(ref, chars), ocr_task.ctc_decode(out, chars)
    truth = json.loads((data / "rec_eval_meta.json").read_text())
    same = np.array([g == w for g, w in zip(got, want, strict=True)])
    right = np.array([w == t for w, t in zip(want, truth, strict=True)])
    res: dict[str, object] = {"agree": float(same.mean())}
    for key, (lo, hi) in MARGIN_BANDS.items():
        band = (margin >= lo) & (margin < hi)
        res[key] = [float(same[band].mean()) if band.any() else None, int(band.sum())]
    res["fp32_right"] = [float(same[right].mean()) if right.any() else None, int(right.sum())]
    res["truth_exact"] = float(np.mean([g == t for g, t in zip(got, truth, strict=True)]))
    res["truth_char"] = ocr_task.char_accuracy(got, truth)
    return res


def strata_table(results: dict[str, dict]) -> str:
    """The rec table of :func:`rec_strata`, one row per variant."""
    res = results.get("rec")
    if not res:
        return ""
    bands = " | ".join(f"fp32 margin {k}" for k in MARGIN_BANDS)
    lines = ["\n### rec: text agreement by fp32's confidence, and accuracy against the "
             "rendered text\n",
             f"| variant | same text as fp32 | {bands} | on texts fp32 reads right | "
             "exact vs truth | char accuracy vs truth |",
             "|---|---|" + "---|" * len(MARGIN_BANDS) + "---|---|---|"]
    for label, v in res["variants"].items():
        st = v.get("strata")
        if not st or label == "fp32 (A/A)":
            continue
        cells = [f"{st[k][0]:.3f} ({st[k][1]})" if st[k][0] is not None else f"- ({st[k][1]})"
                 for k in (*MARGIN_BANDS, "fp32_right")]
        lines.append(f"| {label} | {st['agree']:.3f} | {' | '.join(cells)} | "
                     f"{st['truth_exact']:.3f} | {st['truth_char']:.3f} |")
    return "\n".join(lines) + "\n"


def _fmt_task(t: dict) -> str:
    extra = [f"{k} {v:.3f}" for k, v in t.items() if k != "agree"]
    return f"{t['agree']:.3f}" + (f" ({', '.join(extra)})" if extra else "")


def table(results: dict[str, dict]) -> str:
    lines = ["| model | variant | task agreement vs fp32 | integer kernels (ORT graph) | "
             "float Conv/MatMul left | latency / fp32 (b=1) | quantize s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for label, v in res["variants"].items():
            if "task" not in v:
                continue
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


def _trimmed_text(trace: dict) -> str:
    """The float nodes the search tried back in int8 after its hit, and how many stayed
    int8."""
    tries = trace.get("trimmed") or []
    if not tries:
        return "-"
    back = [t["node"] for t in tries if t["int8"]]
    return f"{len(back)} of {len(tries)} tried ({', '.join(back) or 'none'})"


def details(results: dict[str, dict]) -> str:
    """What the pass's fallback measured, tried and kept float."""
    out = []
    for name, res in results.items():
        out.append(f"\n### {name}: {res['model']} (opset {res['opset']} -> 13), "
                   f"{res['n_calib']} calibration / {res['n_eval']} evaluation samples\n")
        for label, v in res["variants"].items():
            stats = v.get("stats") or {}
            trace = stats.get("fallback")
            if trace:
                probes = [(p["float_nodes"], p["agreement"], p["sqnr_db"])
                          for p in trace.get("probes", [])]
                kept = stats.get("kept_float") or []
                kept_text = (", ".join(kept) if len(kept) <= 12 else
                             f"{len(kept)} nodes, of them "
                             f"{sum(k.split()[0] in ('Conv', 'MatMul', 'Gemm') for k in kept)} "
                             "Conv/MatMul/Gemm")
                out.append(f"- {label}: all-int8 scored {trace.get('score_all_quantized')} "
                           f"on the calibration samples against {trace.get('targets')}; "
                           f"only compute ops int8: {trace.get('score_compute_only', '-')}; "
                           f"probes (float nodes of {trace.get('candidates', '-')}, "
                           f"agreement, SQNR dB): {probes or 'none'}; "
                           f"MatMuls dynamic beside static Convs: {_mixed_text(trace)}; "
                           f"only the MatMuls int8, dynamic: "
                           f"{trace.get('score_dynamic_matmul_only', '-')}; "
                           f"back to int8 after a hit: {_trimmed_text(trace)}; "
                           f"reached: {trace.get('reached', 'met without fallback')}; "
                           f"kept float: {kept_text or 'none'}; "
                           f"static int8 nodes: {stats.get('quantized')}, dynamic MatMuls: "
                           f"{stats.get('dynamic_matmul', 0)}")
            if v.get("message"):
                out.append(f"- {label}: {v['message']}")
            if v.get("note"):
                out.append(f"- {label}: {v['note']}")
    return "\n".join(out)


def _mixed_text(trace: dict) -> str:
    """The search's stage with the MatMuls dynamic and the Convs static: start, probes, kept."""
    sub = trace.get("dynamic_matmul_stage")
    if not sub:
        return "-"
    probes = [(p["float_nodes"], p["agreement"], p["sqnr_db"]) for p in sub.get("probes", [])]
    return (f"all {sub.get('static_nodes')} static {sub.get('score_base')}, probes (float of "
            f"them, agreement, SQNR dB): {probes or 'none'}, reached: {sub.get('reached')}")


def markdown(results: dict[str, dict], info: dict, end_load: str) -> str:
    head = (f"# int8 on the PP-OCR models, judged by the task's own answer\n\n"
            f"Generated by `benchmarks/ocr_quantize.py` on {info['date']}: {info['cpu']} "
            f"(VNNI: {info['vnni']}), {info['usable_cpus']} usable CPUs, load average at start "
            f"{info['load_average_start']}, at end {end_load}; onnxruntime "
            f"{info['onnxruntime']}, onnx {info['onnx']}. Inputs from "
            f"`benchmarks/corpus/ocr_task.py` (rendered text, rapidocr preprocessing). "
            f"Task agreement is with the fp32 model's own answer on the evaluation set; "
            f"latency is batch 1, 2 intra-op threads, median of interleaved paired ratios "
            f"[quartiles], with an fp32 A/A row as the noise floor.\n\n")
    return head + table(results) + "\n" + strata_table(results) + details(results) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--tasks", default="rec,cls,det")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown results file")
    parser.add_argument("--from-json", type=Path, nargs="*", default=None,
                        help="only rewrite --out from earlier --json files (no runs)")
    args = parser.parse_args(argv)
    info = machine.machine_info()
    if args.from_json:
        merged = {k: v for p in args.from_json for k, v in json.loads(p.read_text()).items()}
        args.out.write_text(markdown(merged, info, str(machine.load_average())))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.tasks.split(","):
        results[name] = bench_task(name, args.models, args.data, args.work, args.rounds)
        print(table({name: results[name]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(_jsonable(results), indent=1))
        if args.out:
            args.out.write_text(markdown(results, info, str(machine.load_average())))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
