"""Early exit: the promise over random calibration/evaluation splits, and latency side by side.

From the repository root::

    python benchmarks/early_exit_bench.py [--splits 20] [--rounds 5] [--threads 1]

Part 1 (numpy after one run of each model). The 768 digits samples (calibration and
evaluation files pooled) are split at random ``--splits`` times into calibration and
evaluation halves; exits are planned on the calibration half and replayed on the evaluation
half, on the digits ResNet and the VGG-style digits model. Printed per setting: the promise
(level and kind) beside the measured agreement (mean, minimum, share of splits at or above the
target) and the expected MACs (mean, maximum). The evaluation half measures each split's
agreement with noise (one disagreement in 384 samples is 0.26 points), so ``sig.below`` gives
the share of splits whose evaluation disagreements are significantly more than the target
allows (one-sided binomial test at 5%): a sound promise keeps it near or below 5%.

Part 2 (onnxruntime, digits ResNet, exits planned on ``digits_calib.npz``). Latency of the
single-file form and the bundle runner against a plain session of the original model,
interleaved in a rotating order after a warm-up, median over rounds, at batch 1, 8 and 32,
with an A/A row (a second plain session) for the noise. Then the cost of the If form itself:
the single-file model with every sample exiting at the first exit against stage 0 with its
head as one plain model, both relative to the plain model, and the single-file model with no
sample exiting (what all the exits cost a sample that runs to the end), in the batched form,
in the batch-1 form (the model's batch fixed at 1) and, as the floor, the stages with every
head in one graph without If. Only ratios are printed, with the load average.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.cost import infer_shapes  # noqa: E402
from onnxopt.data import from_arrays, from_npz  # noqa: E402
from onnxopt.ir import opset_version, to_proto  # noqa: E402
from onnxopt.model_io import load  # noqa: E402
from onnxopt.passes.early_exit import EarlyExitModel, write_bundle  # noqa: E402
from onnxopt.passes.early_exit.bundle import head_nodes  # noqa: E402
from onnxopt.passes.early_exit.cuts import (  # noqa: E402
    CANDIDATE_FRACTIONS,
    choose_cuts,
    find_cut_points,
)
from onnxopt.passes.early_exit.early_exit import build_if_form  # noqa: E402
from onnxopt.passes.early_exit.exits import (  # noqa: E402
    ExitPlanError,
    collect_features,
    exit_capable,
    simulate,
)
from onnxopt.passes.early_exit.guarantee import binomial_cdf  # noqa: E402
from onnxopt.passes.early_exit.planning import plan_exits, plan_from_features  # noqa: E402
from onnxopt.passes.early_exit.runner import _stage_with_head  # noqa: E402
from onnxopt.session import make_session  # noqa: E402

logger = logging.getLogger("early_exit_bench")

MODELS = {"digits ResNet": ROOT / "testmodels" / "digits_resnet.onnx",
          "digits VGG": ROOT / "testmodels" / "digits_vgg.onnx"}
CALIB = ROOT / "testmodels" / "digits_calib.npz"
EVAL = ROOT / "testmodels" / "digits_eval.npz"

#: (label, calibration samples, confidence, pooling, candidate fractions)
SETTINGS = [
    ("in expectation", 256, None, "grid", CANDIDATE_FRACTIONS),
    ("in expectation, avg pool, 3 cuts", 256, None, "avg", (0.25, 0.5, 0.75)),
    ("in expectation, 512 calib", 512, None, "grid", CANDIDATE_FRACTIONS),
    ("confidence 0.9", 256, 0.9, "grid", CANDIDATE_FRACTIONS),
    ("confidence 0.9, 384 calib", 384, 0.9, "grid", CANDIDATE_FRACTIONS),
    ("confidence 0.9, 512 calib", 512, 0.9, "grid", CANDIDATE_FRACTIONS),
]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, default=20, help="random calibration/evaluation splits")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the samples")
    p.add_argument("--samples", type=int, default=256, help="eval samples timed per round")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="thread CPU time (default; with 1 thread onnxruntime runs in the "
                        "calling thread, and other jobs on the machine barely count) or wall")
    p.add_argument("--skip-latency", action="store_true", help="only part 1")
    p.add_argument("--skip-splits", action="store_true", help="only part 2")
    return p.parse_args()


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.WARNING)
    with np.load(CALIB) as a, np.load(EVAL) as b:
        x = np.concatenate([a["input"], b["input"]])
        labels = np.concatenate([a["labels"], b["labels"]])
    pooled = from_arrays({"input": x, "labels": labels}, "digits 768")
    if not args.skip_splits:
        print(f"Part 1: {args.splits} random splits of {len(x)} samples, target "
              f"{args.target}; load average {_load()}")
        for name, path in MODELS.items():
            _splits(name, path, pooled, args)
    if not args.skip_latency:
        _latency(args)
    return 0


def _splits(name: str, path: Path, pooled, args: argparse.Namespace) -> None:
    model = infer_shapes(load(path))
    points = [p for p in find_cut_points(model) if exit_capable(p)]
    features = {}
    print(f"\n{name}")
    print(f"{'setting':<34} {'promise':<34} {'agreement mean/min':>19} {'>=target':>9} "
          f"{'sig.below':>9} {'MACs mean/max':>14} {'exits':>6}")
    for label, n_calib, confidence, pool_kind, fractions in SETTINGS:
        cuts = choose_cuts(points, fractions)
        key = (pool_kind, tuple(c.name for c in cuts))
        if key not in features:
            features[key] = collect_features(model, pooled, cuts, pool_kind=pool_kind)
        feats = features[key]
        agreement, macs, exits, promise, missing = [], [], [], "", ""
        below = []  # evaluation disagreements significantly above 1 - target
        for split in range(args.splits):
            order = np.random.default_rng(split).permutation(len(feats))
            calib, evaluation = feats.subset(order[:n_calib]), feats.subset(order[n_calib:])
            try:
                plan = plan_from_features(calib, cuts, ["input"], "logits", target=args.target,
                                          confidence=confidence, pool_kind=pool_kind,
                                          seed=split)
            except ExitPlanError as exc:
                below.append(False)
                agreement.append(1.0)
                macs.append(1.0)
                exits.append(0)
                missing = str(exc)
                continue
            report = simulate(plan, evaluation)
            wrong = int(round((1.0 - report.agreement) * report.samples))
            below.append(wrong > 0 and 1.0 - binomial_cdf(wrong - 1, report.samples,
                                                          1.0 - args.target) < 0.05)
            agreement.append(report.agreement)
            macs.append(report.macs_ratio)
            exits.append(len(plan.heads))
            promise = f">= {args.target:g} {plan.guarantee.kind}"
        a, m = np.asarray(agreement), np.asarray(macs)
        print(f"{label:<34} {promise or '(no exits)':<34} {a.mean():9.4f}/{a.min():.4f} "
              f"{np.mean(a >= args.target):9.0%} {np.mean(below):9.0%} "
              f"{m.mean():7.3f}/{m.max():.3f} "
              f"{np.mean(exits):6.1f}")
        if missing:
            print(f"  {missing}")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _latency(args: argparse.Namespace) -> None:
    path = MODELS["digits ResNet"]
    model = infer_shapes(load(path))
    points = [p for p in find_cut_points(model) if exit_capable(p)]
    plan = plan_exits(model, from_npz(CALIB), choose_cuts(points, CANDIDATE_FRACTIONS),
                      target=args.target)
    single_model = load(path)
    build_if_form(single_model, plan)
    with np.load(EVAL) as npz:
        x = npz["input"][:args.samples]
    first = copy.deepcopy(plan)
    first.heads = first.heads[:1]
    first.heads[0].threshold = -1.0  # every sample exits at the first exit
    first_model = load(path)
    build_if_form(first_model, first)
    never = copy.deepcopy(plan)
    for head in never.heads:
        head.threshold = 3e38  # no sample ever exits: every head, decision and gather runs
    never_model = load(path)
    build_if_form(never_model, never)
    lean_model, lean_never = _batch_one(load(path)), _batch_one(load(path))
    build_if_form(lean_model, plan)
    build_if_form(lean_never, never)
    print(f"\nPart 2: digits ResNet latency ({args.clock} clock), {args.threads} thread(s), "
          f"{args.rounds} rounds of "
          f"{len(x)} samples; exits at {', '.join(plan.cuts)}; expected MACs on the "
          f"held-out threshold samples of {CALIB.name}: {plan.calib_report.macs_ratio:.3f}x")
    with tempfile.TemporaryDirectory() as tmp:
        bundle_path = write_bundle(Path(tmp) / "bundle", model, plan)
        bundle = EarlyExitModel(bundle_path, threads=args.threads)
        manifest = bundle.manifest
        stage0 = make_session(_stage_with_head(bundle_path, manifest["stages"][0],
                                               manifest["exits"][0]), threads=args.threads)
        plain = make_session(path, threads=args.threads)
        plain2 = make_session(path, threads=args.threads)
        single = make_session(to_proto(single_model), threads=args.threads)
        first_exit = make_session(to_proto(first_model), threads=args.threads)
        no_exit = make_session(to_proto(never_model), threads=args.threads)
        lean = make_session(to_proto(lean_model), threads=args.threads)
        lean_no_exit = make_session(to_proto(lean_never), threads=args.threads)
        heads = make_session(to_proto(_with_heads(load(path), plan)), threads=args.threads)
        forms: dict[str, Callable[[np.ndarray], object]] = {
            "plain": lambda s: plain.run(None, {"input": s}),
            "plain (A/A)": lambda s: plain2.run(None, {"input": s}),
            "single-file": lambda s: single.run(None, {"input": s}),
            "bundle runner": lambda s: bundle.run({"input": s}),
        }
        print(f"load average before: {_load()}")
        print(f"{'form':<16} {'batch 1':>8} {'batch 8':>8} {'batch 32':>9}")
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        ratios = {batch: _time(forms, x, batch, args.rounds, clock) for batch in (1, 8, 32)}
        for name in forms:
            print(f"{name:<16} " + " ".join(f"{ratios[b][name]:8.3f}x" for b in (1, 8, 32)))
        lean_ratio = _time({"plain": forms["plain"],
                            "batch-1 form": lambda s: lean.run(None, {"input": s})},
                           x, 1, args.rounds, clock)["batch-1 form"]
        print(f"{'batch-1 form':<16} {lean_ratio:8.3f}x (a model whose batch is fixed at 1: "
              f"no gather, scatter or reduction)")
        overhead = _time({"plain": forms["plain"],
                          "stage 0 + head": lambda s: stage0.run(None, {"input": s}),
                          "If form, all exit 1": lambda s: first_exit.run(None, {"input": s}),
                          "If form, no exit": lambda s: no_exit.run(None, {"input": s}),
                          "batch-1 form, no exit": lambda s: lean_no_exit.run(None,
                                                                               {"input": s}),
                          "stages + heads": lambda s: heads.run(None, {"input": s})},
                         x, 1, args.rounds, clock)
        stage0_time, if_time = overhead["stage 0 + head"], overhead["If form, all exit 1"]
        print(f"cost of the If form at batch 1, every sample exiting at the first exit: "
              f"{if_time:.3f}x of the plain model against {stage0_time:.3f}x for stage 0 and "
              f"its head alone: {if_time - stage0_time:+.3f}x of the plain model per exit taken")
        print(f"no sample exiting (every stage, head and decision runs), relative to the "
              f"plain model: batched If form {overhead['If form, no exit']:.3f}x, batch-1 If "
              f"form {overhead['batch-1 form, no exit']:.3f}x, the stages and every head in "
              f"one graph without If {overhead['stages + heads']:.3f}x")
        print(f"load average after: {_load()}")


def _batch_one(model: ir.Model) -> ir.Model:
    """The model with its input's batch size fixed at 1 (what selects the batch-1 form)."""
    value = model.graph.inputs[0]
    value.shape = ir.Shape([1, *list(value.shape)[1:]])
    return model


def _with_heads(model: ir.Model, plan) -> ir.Model:
    """The plain model with every exit head's logits and margin as extra outputs (no If)."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    for k, head in enumerate(plan.heads):
        parts = head_nodes(values[head.cut], head, opset_version(model), f"exit{k}")
        model.graph.extend(parts.nodes)
        for value in parts.initializers:
            model.graph.register_initializer(value)
        model.graph.outputs.extend([parts.logits, parts.confidence])
    return model


def _time(forms: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, batch: int,
          rounds: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median over rounds of each form's total time, relative to the first form."""
    names = list(forms)
    chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    for name in names:
        for chunk in chunks[:8]:
            forms[name](chunk)
    totals: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for i, chunk in enumerate(chunks):
            for j in range(len(names)):
                name = names[(i + r + j) % len(names)]
                start = clock()
                forms[name](chunk)
                spent[name] += clock() - start
        for name in names:
            totals[name].append(spent[name])
    base = statistics.median(totals[names[0]])
    return {name: statistics.median(totals[name]) / base for name in names}


if __name__ == "__main__":
    sys.exit(main())
