"""prune(latency=X) against prune(macs=...) side by side: measured latency, accuracy, cost model.

Usage, from the repository root::

    python benchmarks/latency_prune.py [--latency 0.5] [--rounds 30] [--runs 5] [--out FILE.md]

Per model (the bundled digits ResNet with its labelled data; random-weight ``testmodels``
structures with residual, depthwise and concat groups, measured by top-1 agreement with the
original on random inputs), in this one run:

1. ``fold-bn,prune(latency=X)`` and ``fold-bn,prune(macs=M)`` for a few ``M``, all planned
   and refitted as a user would run them (one thread, batch 1, the pass's defaults);
2. every pruned model and a second session of the original (the A/A noise row) timed
   against the original in interleaved, warmed-up adjacent pairs at batch 1 and one thread,
   each sample the fastest of a few runs (robust on a shared machine), with the same
   side-by-side timing the planner uses: the median paired ratio, ± half its IQR;
3. the latency plan's prediction against that measurement (the cost model's error), and the
   time the latency planning took on an empty cache and again on the filled one;
4. robustness on the concat structure: ``--runs`` plannings, each on an empty cache, with
   each one's first-plan and kept-plan prediction against the planner's own timing, and all
   the kept plans timed side by side again here;
5. ``prune(latency=X, batch=1;32)`` on digits against the batch-1 plan and ``macs=0.5``,
   timed side by side at batch 1 and at batch 32, with each batch's prediction.

The load average is recorded next to the results: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # testmodels/ is not installed; it lives beside the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from machine import load_average, machine_info  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.ir import to_proto  # noqa: E402
from onnxopt.timing import latency_session, side_by_side  # noqa: E402
from testmodels import DIGITS_CALIB, DIGITS_EVAL, DIGITS_MODEL  # noqa: E402
from testmodels.structures import STRUCTURES  # noqa: E402

MACS = (0.5, 0.4, 0.35, 0.3)
STRUCTURE_MODELS = {"residual": "residual_blocks", "depthwise": "inverted_residual",
                    "concat": "concat_branches"}
SCALE = {"width": 32, "size": 32}


def _data(name: str) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any], bool]:
    if name == "digits":
        calib = dict(np.load(DIGITS_CALIB))
        evals = dict(np.load(DIGITS_EVAL))
        return onnx.load(os.fspath(DIGITS_MODEL)), calib, evals, True
    model = STRUCTURES[STRUCTURE_MODELS[name]](**SCALE)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(0)
    key = model.graph.input[0].name
    return (model, {key: rng.standard_normal((128, *dims)).astype(np.float32)},
            {key: rng.standard_normal((256, *dims)).astype(np.float32)}, False)


def _prune(model: onnx.ModelProto, spec: str, calib: dict[str, Any]) -> tuple[
        onnx.ModelProto, dict[str, Any], float]:
    start = time.perf_counter()
    pruned, report = onnxopt.optimize(model, f"fold-bn,{spec}", calib=calib,
                                      quality_floor=False)
    wall = time.perf_counter() - start
    (record,) = [r for r in report.records if r.name.startswith("prune")]
    return to_proto(pruned), record.stats, wall


def _logits(proto: onnx.ModelProto, evals: dict[str, Any]) -> np.ndarray:
    session = latency_session(proto, threads=1)
    names = [i.name for i in session.get_inputs()]
    n = len(evals[names[0]])
    out = [session.run(None, {k: evals[k][s:s + 64] for k in names})[0]
           for s in range(0, n, 64)]
    return np.concatenate(out).astype(np.float64)


def bench(name: str, target: float, rounds: int) -> dict[str, Any]:
    """Plans, accuracy and side-by-side latency of one model."""
    model, calib, evals, labelled = _data(name)
    variants: dict[str, tuple[onnx.ModelProto, dict[str, Any], float]] = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ONNXOPT_LATENCY_CACHE"] = cache  # an empty cache, then the filled one
        variants[f"latency={target:g}"] = _prune(model, f"prune(latency={target:g})", calib)
        second = _prune(model, f"prune(latency={target:g},plan_only=true)", calib)
    for m in MACS:
        variants[f"macs={m:g}"] = _prune(model, f"prune(macs={m:g})", calib)
    reference = _logits(model, evals)
    labels = np.asarray(evals["labels"]).reshape(-1) if labelled else None
    key = model.graph.input[0].name
    load_before = load_average()
    timed = side_by_side(model, [v[0] for v in variants.values()],
                         {key: np.asarray(evals[key][:1])}, threads=1, rounds=rounds)
    load_after = load_average()
    ratios = {"original": (1.0, 0.0), "A/A": (timed.aa, timed.aa_spread)}
    ratios.update(zip(variants, zip(timed.ratios, timed.spreads, strict=True), strict=True))
    rows = []
    for label, stats in [("original", None), ("A/A", None), *((k, v[1]) for k, v in
                                                               variants.items())]:
        logits = _logits(model if stats is None else variants[label][0], evals)
        top = logits.argmax(axis=1)
        macs = (stats["macs_after"] / stats["macs_before"]
                if stats and stats.get("macs_before") else 1.0)
        noise = float(np.sum((logits - reference) ** 2))
        rows.append({"label": label, "macs": macs, "latency": ratios[label][0],
                     "latency_half_iqr": ratios[label][1],
                     "agreement": float(np.mean(top == reference.argmax(axis=1))),
                     "sqnr_db": (10 * np.log10(float(np.sum(reference ** 2)) / noise)
                                 if noise > 0 else None),
                     "accuracy": float(np.mean(top == labels)) if labels is not None else None,
                     "plan": stats.get("latency") if stats else None,
                     "wall_s": variants[label][2] if label in variants else None})
    first = variants[f"latency={target:g}"][1]["latency"]
    return {"model": name, "labelled": labelled, "rows": rows,
            "original_ms": timed.baseline_ms, "load": [load_before, load_after],
            "cache": {"first": {k: first[k] for k in ("measurements", "cached", "table_seconds",
                                                       "timing_seconds")},
                      "second": {k: second[1]["latency"][k] for k in (
                          "measurements", "cached", "table_seconds", "timing_seconds")},
                      "first_wall_s": variants[f"latency={target:g}"][2],
                      "second_wall_s": second[2]}}


def robustness(name: str, target: float, runs: int, rounds: int) -> dict[str, Any]:
    """``runs`` latency plannings of one model, each on an empty cache, then their kept
    plans timed side by side against the original."""
    model, calib, evals, _ = _data(name)
    plans = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["ONNXOPT_LATENCY_CACHE"] = cache
            proto, stats, wall = _prune(model, f"prune(latency={target:g})", calib)
        lat = stats["latency"]
        plans.append({"proto": proto, "wall_s": wall, **{k: lat[k] for k in (
            "uniform_measured", "history", "predictions", "predicted", "measured",
            "rounds", "noise", "steps")}})
    key = model.graph.input[0].name
    load_before = load_average()
    timed = side_by_side(model, [p.pop("proto") for p in plans],
                         {key: np.asarray(evals[key][:1])}, threads=1, rounds=rounds)
    for plan, ratio, spread in zip(plans, timed.ratios, timed.spreads, strict=True):
        plan.update(retimed=ratio, retimed_half_iqr=spread)
    return {"model": name, "plans": plans, "aa": [timed.aa, timed.aa_spread],
            "load": [load_before, load_average()]}


def batches(name: str, target: float, sizes: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """``latency=X`` planned at all of ``sizes`` against the plan at the first alone and
    ``macs=0.5``, timed side by side at each size."""
    model, calib, evals, labelled = _data(name)
    sizes_text = ";".join(map(str, sizes))
    variants = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ONNXOPT_LATENCY_CACHE"] = cache
        variants[f"latency={target:g} batch={sizes_text}"] = _prune(
            model, f"prune(latency={target:g},batch={sizes_text})", calib)
        variants[f"latency={target:g} batch={sizes[0]}"] = _prune(
            model, f"prune(latency={target:g},batch={sizes[0]})", calib)
    variants["macs=0.5"] = _prune(model, "prune(macs=0.5)", calib)
    key = model.graph.input[0].name
    labels = np.asarray(evals["labels"]).reshape(-1) if labelled else None
    rows = {label: {"plan": v[1].get("latency"), "wall_s": v[2], "latency": {}}
            for label, v in variants.items()}
    load = [load_average()]
    aa = {}
    for size in sizes:
        timed = side_by_side(model, [v[0] for v in variants.values()],
                             {key: np.asarray(evals[key][:size])}, threads=1, rounds=rounds)
        aa[size] = [timed.aa, timed.aa_spread, timed.baseline_ms]
        for label, ratio, spread in zip(variants, timed.ratios, timed.spreads, strict=True):
            rows[label]["latency"][size] = [ratio, spread]
    load.append(load_average())
    reference = _logits(model, evals).argmax(axis=1)
    for label, (proto, stats, _) in variants.items():
        top = _logits(proto, evals).argmax(axis=1)
        rows[label].update(
            macs=stats["macs_after"] / stats["macs_before"],
            agreement=float(np.mean(top == reference)),
            accuracy=float(np.mean(top == labels)) if labels is not None else None)
    return {"model": name, "sizes": list(sizes), "rows": rows, "aa": aa, "load": load}


def _robust_markdown(r: dict[str, Any], target: float) -> list[str]:
    out = [f"## Robustness: {len(r['plans'])} plannings of {r['model']} at latency="
           f"{target:g}, each on an empty cache (load average {r['load'][0]} before, "
           f"{r['load'][1]} after the re-timing)", "",
           "First plan: the knapsack's plan on the calibration line, before any correction "
           "round; `kept`: the plan the planner kept. `planner` is the planner's own timing, "
           "`re-timed` all kept plans timed again here side by side (A/A "
           f"{r['aa'][0]:.2f}x ±{r['aa'][1]:.2f}).", "",
           "| run | uniform | first predicted | first measured | first error | kept predicted "
           "| kept measured (planner) | kept error | re-timed | error vs re-timed | rounds "
           "| plan s | steps per group |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(r["plans"], 1):
        first_pred, first_meas = p["predictions"][0], p["history"][0]
        out.append(
            f"| {i} | {p['uniform_measured']:.2f}x | {first_pred:.2f}x | {first_meas:.2f}x | "
            f"{abs(first_pred - first_meas) / first_meas:.1%} | {p['predicted']:.2f}x | "
            f"{p['measured']:.2f}x | {abs(p['predicted'] - p['measured']) / p['measured']:.1%}"
            f" | {p['retimed']:.2f}x ±{p['retimed_half_iqr']:.2f} | "
            f"{abs(p['predicted'] - p['retimed']) / p['retimed']:.1%} | {p['rounds']} | "
            f"{p['wall_s']:.1f} | "
            f"{' '.join(f'{g}:{k}' for g, k in sorted(p['steps'].items(), key=_index))} |")
    return [*out, ""]


def _index(item: tuple[Any, int]) -> int:
    return int(item[0])  # group indices are strings after a JSON round trip


def _batch_markdown(r: dict[str, Any]) -> list[str]:
    sizes = r["sizes"]
    out = [f"## {r['model']} at batch {' and '.join(map(str, sizes))} (load average "
           f"{r['load'][0]} before, {r['load'][1]} after timing)", "",
           "Each plan timed side by side against the original at every batch (A/A "
           + ", ".join(f"{r['aa'][s][0]:.2f}x ±{r['aa'][s][1]:.2f} at batch {s} "
                       f"(original {r['aa'][s][2]:.3f} ms)" for s in sizes)
           + "); `predicted` is the plan's own prediction at that batch, `planner` its own "
           "measurement.", "",
           "| plan | MACs | " + " | ".join(f"latency b{s} | predicted b{s} | planner b{s}"
                                          for s in sizes) + " | top-1 | agreement | plan s |",
           "|---|---|" + "---|---|---|" * len(sizes) + "---|---|---|"]
    for label, row in r["rows"].items():
        plan = row["plan"] or {}
        per = {p["batch"]: p for p in plan.get("per_batch", [plan] if plan else [])}
        cells = []
        for s in sizes:
            ratio, spread = row["latency"][s]
            mine = per.get(s)
            cells.append(f"{ratio:.2f}x ±{spread:.2f} | "
                         + (f"{mine['predicted']:.2f}x | {mine['measured']:.2f}x" if mine
                            else " | "))
        acc = "" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        out.append(f"| {label} | {row['macs']:.2f}x | " + " | ".join(cells)
                   + f" | {acc} | {row['agreement']:.3f} | {row['wall_s']:.1f} |")
    return [*out, ""]


def _history(plan: dict[str, Any]) -> str:
    """The plans the planner timed: the uniform one, then the first and each correction's,
    the one kept in bold."""
    kept = plan["history"].index(plan["measured"]) if plan["measured"] in plan["history"] else -1
    steps = [f"**{r:.2f}x**" if i == kept else f"{r:.2f}x"
             for i, r in enumerate(plan["history"])]
    return f"uniform {plan['uniform_measured']:.2f}x; " + " → ".join(steps)


def _markdown(results: dict[str, Any], target: float) -> str:
    m = results["machine"]
    out = [f"# prune(latency={target:g}) against prune(macs=...)", "",
           f"Measured {m['date']} with `python benchmarks/latency_prune.py` on {m['cpu']} "
           f"({m['usable_cpus']} usable CPUs), onnxruntime {m['onnxruntime']}, batch 1, "
           f"1 intra-op thread (the plan's and the timing's), shared with other jobs. "
           "Latency: median of interleaved, warmed-up paired ratios against the original "
           "(each sample the fastest of a few runs), ± half the interquartile range; the "
           "A/A row is the noise floor. `predicted` is the latency "
           "plan's own prediction, `error` its distance from the latency measured here; "
           "the plans the planner timed are its calibration (uniform) plan, then its first "
           "plan and each correction round's, as it measured them (the one kept in bold). "
           "Random-weight structures have no labels: agreement is top-1 agreement with the "
           "original on random inputs.", ""]
    for model in results["models"]:
        out += [f"## {model['model']} (original {model['original_ms']:.3f} ms; load average "
                f"{model['load'][0]} before, {model['load'][1]} after timing)", "",
                "| plan | MACs | latency b1 | predicted | error | plans timed while planning | "
                + ("top-1 | " if model["labelled"] else "") + "agreement | SQNR |",
                "|---|---|---|---|---|---|" + ("---|" if model["labelled"] else "") + "---|---|"]
        for row in model["rows"]:
            lat = row["latency"]
            plan = row["plan"]
            pred = f"{plan['predicted']:.2f}x" if plan else ""
            err = f"{abs(plan['predicted'] - lat) / lat:.1%}" if plan else ""
            sqnr = "" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f} dB"
            corr = _history(plan) if plan else ""
            acc = (f"{row['accuracy']:.2%} | " if model["labelled"] else "")
            out.append(f"| {row['label']} | {row['macs']:.2f}x | {lat:.2f}x "
                       f"±{row['latency_half_iqr']:.2f} | {pred} | {err} | "
                       f"{corr} | {acc}{row['agreement']:.3f} | {sqnr} |")
        c = model["cache"]
        out += ["", f"Latency planning on an empty cache: {c['first']['measurements']} node "
                f"timings measured, tables {c['first']['table_seconds']:.2f} s, whole-model "
                f"timings {c['first']['timing_seconds']:.2f} s (whole plan "
                f"{c['first_wall_s']:.1f} s); again on the filled cache: "
                f"{c['second']['measurements']} measured, {c['second']['cached']} read, "
                f"tables {c['second']['table_seconds']:.2f} s, whole-model timings "
                f"{c['second']['timing_seconds']:.2f} s (whole plan {c['second_wall_s']:.1f} s).",
                ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", default="digits,residual,depthwise,concat")
    parser.add_argument("--runs", type=int, default=5,
                        help="plannings of the concat structure on an empty cache (0: none)")
    parser.add_argument("--batches", default="1;32",
                        help="batch sizes planned together on digits ('' for none)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "latency_prune.md")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine_info(), "models": []}
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        results["models"].append(bench(name, args.latency, args.rounds))
    if args.runs:
        print(f"concat robustness ({args.runs} plannings) ...", file=sys.stderr, flush=True)
        results["robustness"] = robustness("concat", args.latency, args.runs, args.rounds)
    if args.batches:
        print(f"digits at batch {args.batches} ...", file=sys.stderr, flush=True)
        sizes = tuple(int(b) for b in args.batches.split(";"))
        results["batches"] = batches("digits", args.latency, sizes, args.rounds)
    results["machine"]["load_average_end"] = load_average()
    text = _markdown(results, args.latency)
    if "robustness" in results:
        text += "\n" + "\n".join(_robust_markdown(results["robustness"], args.latency))
    if "batches" in results:
        text += "\n" + "\n".join(_batch_markdown(results["batches"]))
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
