"""The ``onnxopt split MODEL -o BUNDLE`` command: cut a model into stages, add early exits.

With ``--calib`` the bundle gets exit heads fitted on part of the calibration data and
thresholds, set on the rest, that promise ``--target`` agreement on new samples (in expectation,
or with probability ``--confidence``); without it the bundle is a plain split into stage models (for
pipelining), whose sequence reproduces the model. ``--list-cuts`` prints the cut points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from onnxopt.cli_common import (
    EXIT_OK,
    OneLineParser,
    output_beside,
    run_reporting_user_errors,
    setup_logging,
)
from onnxopt.errors import UserError
from onnxopt.pass_base import register_command


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="onnxopt split",
        description="Split a model at cut points into stage models and, with --calib, add "
                    "exit heads so easy inputs stop early. Writes a bundle folder that "
                    "onnxopt.passes.early_exit.EarlyExitModel runs.",
        epilog="Exit codes: 0 ok, 2 user error (including a model without a cut point).")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", help="bundle folder to write (default: MODEL.bundle)")
    p.add_argument("--calib", help="calibration data (.npz, folder of .npy, random:N); "
                                   "without it no exit heads are fitted")
    p.add_argument("--eval", dest="eval_data",
                   help="evaluation data: the written bundle is run on it and reported")
    p.add_argument("--exits", default="",
                   help="candidate cut tensor names separated by ';' (default: cut points at "
                        "about 5, 15, ..., 85%% of MACs); exits not worth their cost are dropped")
    p.add_argument("--target", type=float, default=0.99,
                   help="promised top-1 agreement with the full model on new samples "
                        "(default 0.99)")
    p.add_argument("--confidence", type=float,
                   help="promise the target with this probability over the calibration draw "
                        "(Learn-then-Test), e.g. 0.9; default: in expectation (conformal risk "
                        "control)")
    p.add_argument("--pool", choices=("grid", "avg"), default="grid",
                   help="head features: 2x2 mean pool (grid) or global average (default grid)")
    p.add_argument("--head-share", type=float,
                   help="share of --calib that fits the heads; the rest sets the thresholds "
                        "(default: half, less when the thresholds need more samples)")
    p.add_argument("--head", choices=("ridge", "logistic"), default="ridge",
                   help="exit head: ridge regression (closed form) or multinomial logistic "
                        "regression (default ridge)")
    p.add_argument("--fit-to", choices=("logits", "labels"), default="logits",
                   help="fit the heads to the full model's logits or to the labels of "
                        "--calib (default logits)")
    p.add_argument("--l2", type=float, default=1e-3, help="head regularisation")
    p.add_argument("--list-cuts", action="store_true", help="print the cut points and exit")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="concrete shape for a dynamic input (repeatable)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="batch size for calibration and evaluation runs (default 64)")
    p.add_argument("--max-samples", type=int, help="cap on calibration/evaluation samples")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker on the input")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random data (random:N) and the folds of the thresholds "
                        "(default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the result")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv for debug)")
    return p


def split_main(argv: Sequence[str] | None = None) -> int:
    """Run ``onnxopt split`` with the arguments after ``split``; returns the exit code."""
    def body() -> int:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        setup_logging(args.verbose, args.quiet)
        return _split(args)

    return run_reporting_user_errors("onnxopt split", body)


def _split(args: argparse.Namespace) -> int:
    from onnxopt.cost import infer_shapes
    from onnxopt.data import open_feeds, parse_input_shapes
    from onnxopt.model_io import check_model, load
    from onnxopt.passes.early_exit import EarlyExitModel, write_bundle
    from onnxopt.passes.early_exit.bundle import check_destination, update_manifest
    from onnxopt.passes.early_exit.cuts import (
        CANDIDATE_FRACTIONS,
        choose_cuts,
        require_cut_points,
        resolve_cuts,
    )
    from onnxopt.passes.early_exit.exits import exit_capable
    from onnxopt.passes.early_exit.planning import plan_exits
    from onnxopt.passes.early_exit.runner import evaluate_bundle

    if not 0.0 < args.target <= 1.0:
        raise UserError(f"--target must be in (0, 1], got {args.target}")
    if args.confidence is not None and not 0.0 < args.confidence < 1.0:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.head_share is not None and not 0.0 < args.head_share < 1.0:
        raise UserError(f"--head-share must be in (0, 1), got {args.head_share}")
    output = Path(args.output) if args.output else output_beside(args.model, ".bundle")
    if not args.list_cuts:
        check_destination(output)
    model = load(args.model)
    if not args.no_check:
        check_model(model, args.model)
    model = infer_shapes(model)
    points = require_cut_points(model)
    if args.list_cuts:
        print(_cut_table(points))
        return EXIT_OK
    names = [n.strip() for n in args.exits.replace(",", ";").split(";") if n.strip()]
    shapes = parse_input_shapes(args.input_shape)
    if args.calib is None:
        cuts = resolve_cuts(points, names) if names else choose_cuts(points)
        write_bundle(output, model, cuts=[c.name for c in cuts])
        print(f"split at {', '.join(c.name for c in cuts)} into {len(cuts) + 1} stages")
        print(f"wrote {output}")
        return EXIT_OK
    usable = [p for p in points if exit_capable(p)]
    cuts = resolve_cuts(usable, names) if names else choose_cuts(usable, CANDIDATE_FRACTIONS)
    calib = open_feeds(args.calib, model, seed=args.seed, input_shapes=shapes)
    plan = plan_exits(model, calib, cuts, target=args.target, confidence=args.confidence,
                      head=args.head, fit_to=args.fit_to, pool_kind=args.pool, l2=args.l2,
                      seed=args.seed, head_share=args.head_share, input_shapes=shapes,
                      batch_size=args.batch_size, limit=args.max_samples)
    write_bundle(output, model, plan)
    if not args.quiet and plan.calib_report is not None:
        print(plan.calib_report.format_table())
    for name, reason in plan.dropped.items():
        print(f"exit at {name} dropped: it {reason}")
    if args.eval_data:
        source = open_feeds(args.eval_data, model, seed=args.seed, input_shapes=shapes)
        report = evaluate_bundle(EarlyExitModel(output, threads=1), model, plan, source,
                                 input_shapes=shapes, batch_size=args.batch_size,
                                 limit=args.max_samples)
        update_manifest(output, evaluation=report.to_dict())
        if not args.quiet:
            print()
        print(report.format_table())
    print(f"wrote {output}")
    return EXIT_OK


def _cut_table(points: Sequence) -> str:
    lines = [f"{'cut point':<32} {'MACs before':>12} {'share':>6}  shape"]
    for p in points:
        shape = "?" if p.shape is None else "[" + ", ".join(str(d) for d in p.shape) + "]"
        lines.append(f"{p.name[:32]:<32} {p.macs_before:>12,} {100 * p.fraction:5.1f}%  {shape}")
    return "\n".join(lines)


register_command("split", split_main)
