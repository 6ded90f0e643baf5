"""Early-exit latency at batch 1: plain session vs bundle runner vs single-file If model.

From the repository root::

    python benchmarks/early_exit_bench.py [--threads 1] [--rounds 5] [--target 0.99]

The trained digits classifier gets exits fitted on its calibration set; then every evaluation
sample is run at batch 1 through the three forms, interleaved sample by sample in a rotating
order (so drift and noise from other processes hit all three alike), after a warm-up. Each
round gives a mean latency per sample per form; the median over rounds is compared. Only ratios
are printed, never absolute times.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.cost import infer_shapes  # noqa: E402
from onnxopt.data import from_npz  # noqa: E402
from onnxopt.ir import to_proto  # noqa: E402
from onnxopt.model_io import load  # noqa: E402
from onnxopt.pass_base import PassContext, get_pass  # noqa: E402
from onnxopt.passes.early_exit import EarlyExitModel, write_bundle  # noqa: E402
from onnxopt.passes.early_exit.cuts import choose_cuts, find_cut_points  # noqa: E402
from onnxopt.passes.early_exit.exits import exit_capable, plan_exits  # noqa: E402
from onnxopt.passes.early_exit.runner import evaluate_bundle  # noqa: E402
from onnxopt.session import make_session  # noqa: E402

logger = logging.getLogger("early_exit_bench")

MODEL = ROOT / "testmodels" / "digits_resnet.onnx"
CALIB = ROOT / "testmodels" / "digits_calib.npz"
EVAL = ROOT / "testmodels" / "digits_eval.npz"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the eval set")
    p.add_argument("--warmup", type=int, default=64, help="warm-up samples per form")
    p.add_argument("--target", type=float, default=0.99)
    return p.parse_args()


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.WARNING)
    model = infer_shapes(load(MODEL))
    cuts = choose_cuts([p for p in find_cut_points(model) if exit_capable(p)])
    plan = plan_exits(model, from_npz(CALIB), cuts, target=args.target)
    single_model = load(MODEL)
    result = get_pass("early-exit")(target=args.target).run(
        single_model, PassContext(calib=from_npz(CALIB)))
    assert result.modified, result.refusals
    with np.load(EVAL) as npz:
        x, labels = npz["input"], npz["labels"]
    with tempfile.TemporaryDirectory() as tmp:
        bundle_path = write_bundle(Path(tmp) / "bundle", model, plan)
        bundle = EarlyExitModel(bundle_path, threads=args.threads)
        report = evaluate_bundle(bundle, model, plan, from_npz(EVAL))
        plain = make_session(MODEL, threads=args.threads)
        single = make_session(to_proto(single_model), threads=args.threads)
        forms = {
            "plain": lambda s: plain.run(None, {"input": s})[0],
            "bundle": lambda s: bundle.run_one({"input": s})[0][0],
            "single-file": lambda s: single.run(None, {"input": s})[0],
        }
        outputs, seconds = _time(forms, x, args.rounds, args.warmup)
    reference = outputs["plain"].argmax(1)
    print(f"digits ResNet, {len(x)} eval samples at batch 1, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, target {args.target}")
    print(f"exits at {', '.join(plan.cuts)}; share answered per exit "
          f"(bundle run): {', '.join(f'{r.fraction:.1%}' for r in report.rows)}")
    print(f"expected MACs per sample: {report.macs_ratio:.3f}x of the full model")
    print(f"{'form':<12} {'agreement':>9} {'accuracy':>9} {'mean latency':>13} "
          f"{'median latency':>15}")
    base_mean = statistics.median(np.mean(r) for r in seconds["plain"])
    base_median = statistics.median(np.median(r) for r in seconds["plain"])
    for name, out in outputs.items():
        mean = statistics.median(np.mean(r) for r in seconds[name]) / base_mean
        median = statistics.median(np.median(r) for r in seconds[name]) / base_median
        print(f"{name:<12} {np.mean(out.argmax(1) == reference):9.4f} "
              f"{np.mean(out.argmax(1) == labels):9.2%} {mean:12.3f}x {median:14.3f}x")
    return 0


def _time(forms: dict, x: np.ndarray, rounds: int, warmup: int,
          ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Per-sample latencies of every form, interleaved in a rotating order."""
    names = list(forms)
    for name in names:
        for i in range(min(warmup, len(x))):
            forms[name](x[i:i + 1])
    outputs = {name: np.empty((len(x), 10), dtype=np.float32) for name in names}
    seconds = {name: [] for name in names}
    for r in range(rounds):
        times = {name: np.empty(len(x)) for name in names}
        for i in range(len(x)):
            sample = x[i:i + 1]
            for j in range(len(names)):
                name = names[(i + r + j) % len(names)]
                start = time.perf_counter()
                out = forms[name](sample)
                times[name][i] = time.perf_counter() - start
                outputs[name][i] = out.reshape(-1)
        for name in names:
            seconds[name].append(times[name])
    return outputs, seconds


if __name__ == "__main__":
    sys.exit(main())
