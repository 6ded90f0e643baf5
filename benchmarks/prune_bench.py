"""Side by side at one MACs budget: what each part of ``prune`` buys, and what it costs to run.

Usage, from the repository root::

    python benchmarks/prune_bench.py [--macs 0.5] [--rounds 30] [--seeds 5] [--json OUT]

Three parts, all measured in this one run:

1. Accuracy on the bundled digits classifiers after ``fold-bn,prune(macs=M, ...)`` with no
   retraining, in three tables on the ResNet (``digits``) and the first two on the VGG-style
   model (``digits_vgg``, whose hidden fc layer has dead units, the case APoZ was made for):

   - *criteria*: every criterion at the same widths (``allocation=uniform, round_to=1``, so
     only which channels go differs), with and without the least-squares reconstruction;
   - *the default*: every criterion with the default allocation (knapsack valued by measured
     sensitivity, checked against uniform) at the default ``round_to=16``;
   - *allocation*: knapsack against uniform at ``round_to=16`` (where uniform cannot get
     close to the target), at ``round_to=1``, and with the knapsack aimed at the MACs uniform
     reached (matched MACs); the calibration errors of both plans that the pass compared.

   Top-1 accuracy on the 512 evaluation samples, top-1 agreement with the original and the
   SQNR of the logits against the original's (finer than top-1, where one sample is 0.2
   points); ``random`` is averaged over ``--seeds`` seeds (with the range of its SQNR).
2. Latency of the pruned digits model (the default ``round_to=16``, and ``round_to=1``)
   against the unpruned one (``fold-bn``) and the original at batch 32, 2 intra-op threads,
   warmed up and interleaved in adjacent pairs (``latency.measure``): only ratios are results.
3. The same latency ratio on a compute-bound random residual model (``residual_blocks``,
   width 64, 64x64 inputs), pruned by ``l1`` (no data needed for the widths).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # testmodels/ is not installed; it lives beside the package
    sys.path.insert(0, str(ROOT))

import latency  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.cost import infer_shapes, model_cost  # noqa: E402
from onnxopt.ir import from_proto, to_proto  # noqa: E402
from testmodels import (  # noqa: E402
    DIGITS_CALIB,
    DIGITS_EVAL,
    DIGITS_MODEL,
    DIGITS_VGG,
    residual_blocks,
)

CRITERIA = ("thinet", "l1", "l2", "apoz", "bn", "random")
SCALED = {"width": 64, "size": 64}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _logits(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/m.onnx"
        onnx.save(model, path)
        session = latency.bench_session(path)
        return np.concatenate([session.run(None, {"input": inputs[i:i + 128]})[0]
                               for i in range(0, len(inputs), 128)])


def _prune(base: onnx.ModelProto, spec: str, calib: str | None,
           seed: int = 0) -> tuple[onnx.ModelProto, float, dict]:
    """The pruned model, the seconds it took and the last pass's stats."""
    start = time.perf_counter()
    model, report = onnxopt.optimize(base, spec, calib=calib, validate=False, seed=seed)
    failures = [r for r in report.records if r.failed]
    if failures:
        raise RuntimeError(f"{spec}: {failures[0].message}")
    return to_proto(model), time.perf_counter() - start, report.records[-1].stats


TABLES = {
    "criteria": "every criterion at the same widths (uniform allocation, round_to=1)",
    "default": "every criterion with the default allocation (knapsack, round_to=16)",
    "allocation": "knapsack against uniform (thinet, reconstruction)",
}


MODELS = {"digits": (DIGITS_MODEL, tuple(TABLES)),
          "digits_vgg": (DIGITS_VGG, ("criteria", "default"))}
"""Model name -> (path, the tables of part 1 run on it)."""


def _runs(macs: float, tables: tuple[str, ...]) -> list[dict]:
    """The rows of part 1 in ``tables``; ``macs=None`` marks the matched-MACs knapsack."""
    runs = [{"table": "criteria", "criterion": c, "allocation": "uniform", "round_to": 1,
             "refit": r, "macs": macs} for r in (True, False) for c in CRITERIA]
    runs += [{"table": "default", "criterion": c, "allocation": "knapsack", "round_to": 16,
              "refit": True, "macs": macs} for c in ("thinet", "l1", "apoz", "random")]
    runs += [{"table": "allocation", "criterion": "thinet", "allocation": a, "round_to": r,
              "refit": True, "macs": macs} for r in (16, 1) for a in ("knapsack", "uniform")]
    runs.append({"table": "allocation", "criterion": "thinet", "allocation": "knapsack",
                 "round_to": 1, "refit": True, "macs": None})
    return [run for run in runs if run["table"] in tables]


def accuracy_table(macs: float, seeds: int, name: str) -> list[dict]:
    """Part 1 on the model ``name`` of :data:`MODELS`: one row per run of :func:`_runs`."""
    path, tables = MODELS[name]
    data = np.load(DIGITS_EVAL)
    inputs, labels = data["input"], data["labels"]
    folded, _, _ = _prune(onnx.load(path), "fold-bn", None)
    logits = _logits(onnx.load(path), inputs)
    reference = logits.argmax(1)
    rows = [{"model": name, "table": t, "criterion": "(original)", "allocation": "", "round_to": "",
             "reconstruct": "", "target": "", "accuracy": float(np.mean(reference == labels)),
             "agreement": 1.0, "sqnr_db": float("inf"), "sqnr_spread": 0.0, "macs": 1.0,
             "seconds": 0.0, "plan": ""} for t in tables]
    full = _macs(folded)
    uniform_reached = macs
    for run in _runs(macs, tables):
        target = run["macs"] if run["macs"] is not None else uniform_reached
        accs, agrees, sqnrs, macs_kept, times, plans = [], [], [], [], [], []
        for seed in range(seeds if run["criterion"] == "random" else 1):
            spec = (f"prune(macs={target:.4g},criterion={run['criterion']},"
                    f"allocation={run['allocation']},reconstruct={str(run['refit']).lower()},"
                    f"round_to={run['round_to']})")
            pruned, seconds, stats = _prune(folded, spec, str(DIGITS_CALIB), seed)
            macs_kept.append(_macs(pruned) / full)
            got = _logits(pruned, inputs)
            top = got.argmax(1)
            sqnrs.append(float(10 * np.log10(np.sum(logits ** 2) / np.sum((got - logits) ** 2))))
            accs.append(float(np.mean(top == labels)))
            agrees.append(float(np.mean(top == reference)))
            times.append(seconds)
            plans.append(_plan_note(stats))
        if run["table"] == "allocation" and run["allocation"] == "uniform":
            uniform_reached = float(np.mean(macs_kept))
        rows.append({"model": name, "table": run["table"], "criterion": run["criterion"],
                     "allocation": run["allocation"], "round_to": run["round_to"],
                     "reconstruct": "yes" if run["refit"] else "no",
                     "target": f"{target:.1%}", "accuracy": float(np.mean(accs)),
                     "agreement": float(np.mean(agrees)), "sqnr_db": float(np.mean(sqnrs)),
                     "sqnr_spread": float(np.ptp(sqnrs)), "macs": float(np.mean(macs_kept)),
                     "seconds": float(np.mean(times)), "plan": plans[0]})
        _log(f"  {name:<10} {run['table']:<10} {run['criterion']:<7} {run['allocation']:<8} "
             f"round_to={run['round_to']:<2} refit={run['refit']!s:<5} target {target:.3f} "
             f"acc {rows[-1]['accuracy']:.2%}  agree {rows[-1]['agreement']:.2%}  "
             f"sqnr {rows[-1]['sqnr_db']:.2f} dB  macs {rows[-1]['macs']:.3f}")
    return rows


def _plan_note(stats: dict) -> str:
    """Which allocation the pass kept, with the calibration errors it compared."""
    check = stats.get("allocation_check")
    if not check:
        return ""
    return (f"{stats['allocation']} kept (calib error knapsack {check['knapsack_error']:.2e}, "
            f"uniform {check['uniform_error']:.2e})")


def _macs(model: onnx.ModelProto) -> int:
    return model_cost(infer_shapes(from_proto(model))).macs


def latency_ratios(models: dict[str, onnx.ModelProto], baseline: str, feed: np.ndarray,
                   rounds: int) -> dict[str, dict]:
    """Parts 2 and 3: paired latency ratios against ``baseline`` at the feed's batch."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for label, model in models.items():
            path = f"{tmp}/{len(sessions)}.onnx"
            onnx.save(model, path)
            sessions[label] = latency.bench_session(path)
        stats = latency.measure(sessions, {"input": feed}, baseline, rounds=rounds)
    return {label: s.to_dict() for label, s in stats.items()}


def _markdown(rows: list[dict], speed: dict[str, dict[str, dict]], macs: float) -> str:
    lines = []
    for model, table in dict.fromkeys((r["model"], r["table"]) for r in rows):
        lines += [f"prune at {macs:.0%} MACs on {model}: {TABLES[table]} (no retraining; eval "
                  f"512 samples)", "",
                  "| criterion | allocation | round_to | reconstruct | target | MACs kept | top-1 "
                  "| agreement | logit SQNR | time | plan |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if (r["model"], r["table"]) == (model, table)):
            spread = f" (range {r['sqnr_spread']:.1f})" if r["sqnr_spread"] else ""
            lines.append(f"| {r['criterion']} | {r['allocation']} | {r['round_to']} | "
                         f"{r['reconstruct']} | {r['target']} | {r['macs']:.1%} | "
                         f"{r['accuracy']:.2%} | {r['agreement']:.2%} | "
                         f"{r['sqnr_db']:.1f} dB{spread} | {r['seconds']:.1f}s | {r['plan']} |")
        lines.append("")
    for model, stats in speed.items():
        lines += [f"latency on {model}, batch 32, 2 threads (ratio of time; <1 is faster)",
                  "", "| model | time ratio | speed-up | IQR of ratio |", "|---|---|---|---|"]
        for label, s in stats.items():
            lines.append(f"| {label} | {s['ratio']:.3f} | {1 / s['ratio']:.2f}x | "
                         f"{s['ratio_q1']:.3f}-{s['ratio_q3']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    parser.add_argument("--seeds", type=int, default=5, help="seeds averaged for random")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    rows = [] if args.skip_accuracy else [
        row for name in MODELS for row in accuracy_table(args.macs, args.seeds, name)]
    _log("latency: digits")
    original = onnx.load(DIGITS_MODEL)
    folded, _, _ = _prune(original, "fold-bn", None)
    pruned, _, _ = _prune(folded, f"prune(macs={args.macs:g})", str(DIGITS_CALIB))
    any_width, _, _ = _prune(folded, f"prune(macs={args.macs:g},round_to=1)",
                             str(DIGITS_CALIB))
    feed = np.load(DIGITS_EVAL)["input"][:32]
    speed = {"digits": latency_ratios({"fold-bn (baseline)": folded, "original": original,
                                       f"pruned {args.macs:.0%} MACs": pruned,
                                       f"pruned {args.macs:.0%} MACs, round_to=1": any_width},
                                      "fold-bn (baseline)", feed, args.rounds)}
    _log("latency: residual_blocks width 64, 64x64")
    big, _, _ = _prune(residual_blocks(**SCALED), "fold-bn", None)
    big_pruned, _, _ = _prune(big, f"prune(macs={args.macs:g},criterion=l1,data_free=true)",
                              None)
    feed = np.random.default_rng(0).standard_normal((32, 3, 64, 64)).astype(np.float32)
    speed["residual_blocks w64 s64"] = latency_ratios(
        {"fold-bn (baseline)": big, f"pruned {args.macs:.0%} MACs": big_pruned},
        "fold-bn (baseline)", feed, args.rounds)
    table = _markdown(rows, speed, args.macs)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": rows, "latency": speed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
