"""Command line: ``onnxopt MODEL -p PIPELINE``, ``onnxopt info MODEL``, ``--list-passes``."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from onnxopt.cli_common import (
    EXIT_OK,
    EXIT_VALIDATION,
    OneLineParser,
    output_beside,
    package_version,
    quiet_broken_pipe,
    run_reporting_user_errors,
    setup_logging,
)
from onnxopt.errors import UserError

logger = logging.getLogger("onnxopt")

DEFAULT_PIPELINE = "cleanup,fold-bn"


def _main_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="onnxopt",
        description="Optimize an ONNX model with a pipeline of passes; every rewrite is "
                    "checked with onnxruntime. 'onnxopt info MODEL' prints its cost; "
                    "'onnxopt split MODEL --calib DATA' writes an early-exit bundle.",
        epilog="Exit codes: 0 ok, 1 validation failure or missed gate, 2 user error, 141 "
               "stdout closed by its reader.")
    p.add_argument("model", nargs="?", help="input .onnx model")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                   help="print the version and exit")
    p.add_argument("-p", "--pipeline", default=DEFAULT_PIPELINE,
                   help=f"passes, e.g. 'cleanup,fold-bn,prune(ratio=0.3)' "
                        f"(default: {DEFAULT_PIPELINE})")
    p.add_argument("-o", "--output", help="output path (default: MODEL.opt.onnx)")
    p.add_argument("--calib", help="calibration data: .npz, folder of .npy, or random:N")
    p.add_argument("--eval", dest="eval_data",
                   help="validation data (labels give accuracy); default: --calib, "
                        "else random:16")
    p.add_argument("--report", help="write the per-pass report as JSON to this path")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any pass is rolled back")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the checker and onnxruntime validation after each pass")
    p.add_argument("--no-check", action="store_true",
                   help="proceed even if the input fails onnx.checker or has NaN/Inf weights")
    p.add_argument("--min-agreement", type=float, metavar="X",
                   help="quality floor for classifier outputs: lossy passes must keep top-1 "
                        "agreement with the original >= X, else they are rolled back and "
                        "the run exits 1 (default 0.9; 0 removes it)")
    p.add_argument("--min-sqnr", type=float, metavar="DB",
                   help="quality floor for other float outputs (maps, boxes, embeddings): "
                        "SQNR against the original >= DB (default 10)")
    p.add_argument("--no-quality-floor", action="store_true",
                   help="no default quality floor on lossy passes (explicit "
                        "--min-agreement/--min-sqnr still apply)")
    p.add_argument("--max-accuracy-drop", type=float, metavar="X",
                   help="lossy passes may lose at most X accuracy (fraction, 0.01 = 1 point)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="concrete shape for a dynamic input (repeatable)")
    p.add_argument("--cast-inputs", action="store_true",
                   help="convert data of any numeric type to the model's input types, values "
                        "as they are (default: integer data for a float input is an error)")
    p.add_argument("--batch-size", type=int, default=32, help="validation batch size")
    p.add_argument("--max-samples", type=int, help="cap on validation samples")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random data (random:N) and for passes that sample "
                        "(default 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only: passes with a plan mode (prune, early-exit) print what "
                        "they would do; exact passes before them run, the others do not; "
                        "nothing is written but --report")
    p.add_argument("--list-passes", action="store_true", help="list passes and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the result")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv for debug)")
    return p


def _info_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="onnxopt info", description="Print a model's parameters, MACs, size "
                "and op histogram.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--groups", action="store_true",
                   help="also print the channel dependency groups")
    p.add_argument("--top", type=int, default=10, help="how many costliest nodes to list")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="concrete shape to cost a dynamic input at (repeatable)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv for debug)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console script)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _run_command(args_list)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
    except BrokenPipeError:  # `onnxopt ... | head`: the reader has gone; stop quietly
        return quiet_broken_pipe()
    return code


def _run_command(args_list: list[str]) -> int:
    if args_list and args_list[0] != "info" and not args_list[0].startswith("-"):
        from onnxopt.pass_base import registered_commands

        command = registered_commands().get(args_list[0])  # e.g. 'split' (early exit)
        if command is not None:
            return command(args_list[1:])
    return run_reporting_user_errors("onnxopt", lambda: _dispatch(args_list))


def _dispatch(args_list: list[str]) -> int:
    if args_list[:1] == ["info"]:
        args = _info_parser().parse_args(args_list[1:])
        setup_logging(args.verbose, quiet=False)
        return _info(args)
    args = _main_parser().parse_args(args_list)
    setup_logging(args.verbose, args.quiet)
    if args.list_passes:
        print(_list_passes())
        return EXIT_OK
    if not args.model:
        raise UserError("no model given; usage: onnxopt MODEL -p PIPELINE [-o OUT]")
    return _optimize(args)


def _list_passes() -> str:
    """Each pass: kind and description, its defaults in pipeline syntax, what options take."""
    from onnxopt.pass_base import registered_passes
    from onnxopt.pipeline import describe_options

    lines = []
    for name, cls in registered_passes().items():
        kind = "exact" if cls.exact else "lossy"
        data = ", needs --calib" if cls.needs_data else ""
        plan = ", plans with --dry-run" if cls.supports_dry_run else ""
        lines.append(textwrap.fill(f"{name:<14} {kind}{data}{plan}: {cls.description}",
                                   width=100, subsequent_indent=" " * 15))
        options = describe_options(cls)
        if options:
            lines.append(options)
    return "\n".join(lines)


def _optimize(args: argparse.Namespace) -> int:
    from onnxopt.api import optimize
    from onnxopt.data import parse_input_shapes
    from onnxopt.model_io import check_model, check_writable, load, write_text
    from onnxopt.pipeline import parse_pipeline
    from onnxopt.report import Status

    passes = parse_pipeline(args.pipeline)
    if args.dry_run and not any(p.supports_dry_run for p in passes):
        from onnxopt.pass_base import registered_passes

        able = [name for name, cls in registered_passes().items() if cls.supports_dry_run]
        raise UserError(f"--dry-run: no pass in the pipeline has a plan-only mode "
                        f"({', '.join(able)} {'has' if len(able) == 1 else 'have'} one)")
    output = Path(args.output) if args.output else output_beside(args.model, ".opt.onnx")
    if not args.dry_run:
        check_writable(output)
    if args.report:  # checked with the output, before any work (written even by a dry run)
        check_writable(Path(args.report))
        if not args.dry_run and Path(args.report).resolve() == output.resolve():
            raise UserError(f"--report and the output are the same file: {output}")
    for name, value in (("--min-agreement", args.min_agreement),
                        ("--max-accuracy-drop", args.max_accuracy_drop)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{name} must be a fraction between 0 and 1, got {value}")
    model = load(args.model)
    if not args.no_check:
        check_model(model, args.model)
    show_progress = not args.quiet
    _, report = optimize(
        model, passes, calib=args.calib, eval=args.eval_data,
        output=None if args.dry_run else output,
        validate=not args.no_validate, min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop, min_sqnr_db=args.min_sqnr,
        quality_floor=not args.no_quality_floor,
        input_shapes=parse_input_shapes(args.input_shape), batch_size=args.batch_size,
        max_samples=args.max_samples, progress=show_progress, seed=args.seed,
        dry_run=args.dry_run, cast_inputs=args.cast_inputs)
    if args.report:  # before printing, so a closed stdout (| head) cannot lose it
        write_text(args.report, report.to_json())
    if not args.quiet:
        print(report.format_table())
    if args.dry_run:
        for record in report.records:
            if record.plan:
                print(f"{record.name} plan:\n{record.plan}")
    print("dry run: no model written" if args.dry_run else f"wrote {output}")
    crashed = [r for r in report.failures if r.status is Status.CRASHED]
    if crashed:
        print(f"onnxopt: pass {crashed[0].name} crashed, which is a bug (-v shows the "
              f"traceback); the model written is the one before it", file=sys.stderr)
        return EXIT_VALIDATION
    gate_failures = [r for r in report.failures if r.status is Status.GATE_FAILED]
    if gate_failures:
        # Each miss is stated once: in the table, or here when -q left the table out.
        if args.quiet:
            for r in gate_failures:
                print(f"onnxopt: gate missed by pass {r.name}: {r.message}", file=sys.stderr)
        else:
            print(f"onnxopt: exit 1: gate missed by "
                  f"{', '.join(r.name for r in gate_failures)} (see the table)",
                  file=sys.stderr)
        return EXIT_VALIDATION
    if args.strict and report.failures:
        first = report.failures[0]
        # Stated once on stderr: the manager's warning gives the reason unless -q hid it.
        reason = f": {first.message}" if args.quiet else " (reason above)"
        print(f"onnxopt: --strict: exit 1: pass {first.name} {first.status}{reason}",
              file=sys.stderr)
        return EXIT_VALIDATION
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    from onnxopt.cost import infer_shapes, model_cost
    from onnxopt.data import parse_input_shapes
    from onnxopt.model_io import file_size, load
    from onnxopt.report import _bytes, _num

    model = infer_shapes(load(args.model))
    cost = model_cost(model, parse_input_shapes(args.input_shape))
    print(f"model     {args.model}")
    for value in model.graph.inputs:
        print(f"input     {value.name} {_shape(value)} {value.dtype}")
    for value in model.graph.outputs:
        print(f"output    {value.name} {_shape(value)} {value.dtype}")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in model.opset_imports.items())
    print(f"opsets    {opsets}  (IR version {model.ir_version})")
    print(f"nodes     {cost.nodes}")
    print(f"params    {cost.params:,} ({_num(cost.params)})")
    at = f" at {cost.costed_at}" if cost.costed_at else ""
    if cost.macs is None:
        print(f"MACs      unknown: {cost.macs_unknown}")
        print(f"          at least {cost.macs_counted:,} ({_num(cost.macs_counted)}) per sample"
              f"{at}, counting only the nodes whose shapes are known")
    else:
        print(f"MACs      {cost.macs:,} ({_num(cost.macs)}) per sample{at}")
    print(f"size      {file_size(args.model):,} bytes ({_bytes(file_size(args.model))})")
    print("ops       " + ", ".join(f"{op} {n}" for op, n in cost.op_histogram.most_common()))
    known = [(name, macs) for name, macs in cost.per_node.items() if macs]
    top = sorted(known, key=lambda kv: -kv[1])[: args.top]
    if top:
        print("costliest nodes (MACs):")
        for name, macs in top:
            share = "" if cost.macs is None else f"  {100 * macs / max(cost.macs, 1):5.1f}%"
            print(f"  {name:<40} {macs:>14,}{share}")
        unknown = sum(macs is None for macs in cost.per_node.values())
        if unknown:
            print(f"  ({unknown} nodes with unknown MACs not listed)")
    if args.groups:
        from onnxopt.channels import format_groups

        print(format_groups(model))
    return EXIT_OK


def _shape(value) -> str:
    if value.shape is None:
        return "[?]"
    return "[" + ", ".join(str(d) for d in value.shape) + "]"
