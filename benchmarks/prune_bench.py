"""Side by side at one MACs budget: what each part of ``prune`` buys, and what it costs to run.

Usage, from the repository root::

    python benchmarks/prune_bench.py [--macs 0.5] [--rounds 30] [--seeds 5] [--json OUT]

Three parts, all measured in this one run:

1. Accuracy on the bundled digits classifier after ``fold-bn,prune(macs=M, ...)`` with no
   retraining: every criterion (thinet, l1, l2, apoz, bn, random) with and without the
   least-squares reconstruction, and knapsack against uniform allocation (at round_to=16 and
   at round_to=1, where uniform can reach the same MACs). Top-1 accuracy on
   the 512 evaluation samples, top-1 agreement with the original and the SQNR of the logits
   against the original's (finer than top-1, where one sample is 0.2 points); ``random`` is
   averaged over ``--seeds`` seeds (with the spread of its SQNR).
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
from onnxopt.analysis.cost import infer_shapes, model_cost  # noqa: E402
from onnxopt.ir import from_proto, to_proto  # noqa: E402
from testmodels import DIGITS_CALIB, DIGITS_EVAL, DIGITS_MODEL, residual_blocks  # noqa: E402

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
           seed: int = 0) -> tuple[onnx.ModelProto, float]:
    start = time.perf_counter()
    model, report = onnxopt.optimize(base, spec, calib=calib, validate=False, seed=seed)
    failures = [r for r in report.records if r.failed]
    if failures:
        raise RuntimeError(f"{spec}: {failures[0].message}")
    return to_proto(model), time.perf_counter() - start


def accuracy_table(macs: float, seeds: int) -> list[dict]:
    """Part 1: one row per (criterion, allocation, reconstruction)."""
    data = np.load(DIGITS_EVAL)
    inputs, labels = data["input"], data["labels"]
    folded, _ = _prune(onnx.load(DIGITS_MODEL), "fold-bn", None)
    logits = _logits(onnx.load(DIGITS_MODEL), inputs)
    reference = logits.argmax(1)
    rows = [{"criterion": "(original)", "allocation": "", "round_to": "", "reconstruct": "",
             "accuracy": float(np.mean(reference == labels)), "agreement": 1.0,
             "sqnr_db": float("inf"), "sqnr_spread": 0.0, "macs": 1.0, "seconds": 0.0}]
    full = _macs(folded)
    runs = [(c, "knapsack", r, 16) for c in CRITERIA for r in (True, False)]
    runs += [(c, "uniform", r, 16) for c in ("thinet", "l1") for r in (True, False)]
    # round_to=16 leaves uniform few widths (it lands well under the target): also compare
    # the two allocations at any width, where both reach about the same MACs
    runs += [("thinet", a, True, 1) for a in ("knapsack", "uniform")]
    for criterion, allocation, refit, round_to in runs:
        accs, agrees, sqnrs, macs_kept, times = [], [], [], [], []
        for seed in range(seeds if criterion == "random" else 1):
            spec = (f"prune(macs={macs:g},criterion={criterion},allocation={allocation},"
                    f"reconstruct={str(refit).lower()},round_to={round_to})")
            pruned, seconds = _prune(folded, spec, str(DIGITS_CALIB), seed)
            macs_kept.append(_macs(pruned) / full)
            got = _logits(pruned, inputs)
            top = got.argmax(1)
            sqnrs.append(float(10 * np.log10(np.sum(logits ** 2) / np.sum((got - logits) ** 2))))
            accs.append(float(np.mean(top == labels)))
            agrees.append(float(np.mean(top == reference)))
            times.append(seconds)
        rows.append({"criterion": criterion, "allocation": allocation, "round_to": round_to,
                     "reconstruct": "yes" if refit else "no", "accuracy": float(np.mean(accs)),
                     "agreement": float(np.mean(agrees)), "sqnr_db": float(np.mean(sqnrs)),
                     "sqnr_spread": float(np.ptp(sqnrs)), "macs": float(np.mean(macs_kept)),
                     "seconds": float(np.mean(times))})
        _log(f"  {criterion:<7} {allocation:<8} round_to={round_to:<2} refit={refit!s:<5} "
             f"acc {rows[-1]['accuracy']:.2%}  agree {rows[-1]['agreement']:.2%}  "
             f"sqnr {rows[-1]['sqnr_db']:.2f} dB")
    return rows


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
    lines = [f"prune at {macs:.0%} MACs on digits (no retraining; eval 512 samples)", "",
             "| criterion | allocation | round_to | reconstruct | MACs kept | top-1 | agreement "
             "| logit SQNR | time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" (range {r['sqnr_spread']:.1f})" if r["sqnr_spread"] else ""
        lines.append(f"| {r['criterion']} | {r['allocation']} | {r['round_to']} | "
                     f"{r['reconstruct']} | "
                     f"{r['macs']:.1%} | {r['accuracy']:.2%} | {r['agreement']:.2%} | "
                     f"{r['sqnr_db']:.1f} dB{spread} | {r['seconds']:.1f}s |")
    for model, stats in speed.items():
        lines += ["", f"latency on {model}, batch 32, 2 threads (ratio of time; <1 is faster)",
                  "", "| model | time ratio | speed-up | IQR of ratio |", "|---|---|---|---|"]
        for label, s in stats.items():
            lines.append(f"| {label} | {s['ratio']:.3f} | {1 / s['ratio']:.2f}x | "
                         f"{s['ratio_q1']:.3f}-{s['ratio_q3']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    parser.add_argument("--seeds", type=int, default=5, help="seeds averaged for random")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    rows = [] if args.skip_accuracy else accuracy_table(args.macs, args.seeds)
    _log("latency: digits")
    original = onnx.load(DIGITS_MODEL)
    folded, _ = _prune(original, "fold-bn", None)
    pruned, _ = _prune(folded, f"prune(macs={args.macs:g})", str(DIGITS_CALIB))
    any_width, _ = _prune(folded, f"prune(macs={args.macs:g},round_to=1)", str(DIGITS_CALIB))
    feed = np.load(DIGITS_EVAL)["input"][:32]
    speed = {"digits": latency_ratios({"fold-bn (baseline)": folded, "original": original,
                                       f"pruned {args.macs:.0%} MACs": pruned,
                                       f"pruned {args.macs:.0%} MACs, round_to=1": any_width},
                                      "fold-bn (baseline)", feed, args.rounds)}
    _log("latency: residual_blocks width 64, 64x64")
    big, _ = _prune(residual_blocks(**SCALED), "fold-bn", None)
    big_pruned, _ = _prune(big, f"prune(macs={args.macs:g},criterion=l1)", None)
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
