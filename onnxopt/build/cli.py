"""The ``onnxopt build [RECIPE]`` and ``onnxopt sweep MODEL`` commands: parsing and printing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxopt.build.job import JobResult
from onnxopt.cli_common import OneLineParser, run_reporting_user_errors, setup_logging
from onnxopt.errors import UserError


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--ray [ADDRESS]`` and ``--ray-files``, shared by build and sweep."""
    p.add_argument("-j", "--jobs", type=int, default=1,
                   help="local worker processes (default 1: one job after another)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run each job as a Ray task: on a Ray started for the run, or on the "
                        "cluster at ADDRESS (needs the extra: pip install 'onnxopt[ray]')")
    p.add_argument("--ray-files", choices=("auto", "path", "store"), default="auto",
                   help="how model and data files reach Ray workers: by path (shared "
                        "storage), through the object store, or auto: probe the cluster "
                        "(default)")


def _build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="onnxopt build",
        description="Build every model of a recipe (onnxopt.toml): optimize it with its "
                    "pipeline, data and gates, write the model and its JSON report, then a "
                    "summary (summary.md and a self-contained summary.html). Entries whose "
                    "inputs, options and tool versions are unchanged are skipped.",
        epilog="Exit codes: 0 ok, 1 a gate was missed (or a pass crashed), 2 user error "
               "(in the recipe, or in an entry: the other entries are still built).")
    p.add_argument("recipe", nargs="?", default="onnxopt.toml",
                   help="the recipe file, or a folder holding onnxopt.toml (default: "
                        "./onnxopt.toml)")
    add_executor_options(p)
    p.add_argument("--force", action="store_true", help="rebuild every entry, cached or not")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the result")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv for debug)")
    return p


def build_main(argv: Sequence[str] | None = None) -> int:
    """Run ``onnxopt build`` with the arguments after ``build``; returns the exit code."""
    def body() -> int:
        from onnxopt.build.build import build
        from onnxopt.build.executors import make_executor
        from onnxopt.build.recipe import load_recipe

        args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        setup_logging(args.verbose, args.quiet)
        recipe = load_recipe(args.recipe)
        executor = make_executor(args.jobs, args.ray, args.ray_files)
        width = max(len(e.name) for e in recipe.entries)

        def progress(done: int, total: int, result: JobResult) -> None:
            print(f"[{done}/{total}] {result.name:<{width}}  {describe(result)}", flush=True)

        outcome = build(recipe, executor, force=args.force, progress=progress,
                        verbose=args.verbose - (1 if args.quiet else 0))
        counts: dict[str, int] = {}
        for r in outcome.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        print(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; run {outcome.executor}")
        for path in outcome.summary_paths:
            print(f"wrote {path}")
        return outcome.exit_code

    return run_reporting_user_errors("onnxopt build", body)


def describe(result: JobResult) -> str:
    """One progress line's text for a finished job."""
    from onnxopt.build.summary import figures, ratio

    if result.report is None:
        return f"{result.status}: {result.message.strip().splitlines()[0]}"
    f = figures(result.report)
    o, n = f["original"], f["final"]
    text = (f"{result.status}  MACs {ratio(n['macs'], o['macs'])}  size "
            f"{ratio(n['bytes'], o['bytes'])}")
    if f["accuracy"] is not None:
        text += f"  acc {100 * f['accuracy']:.2f}%"
    elif f["agreement"] is not None:
        text += f"  agree {f['agreement']:.4f}"
    text += "" if result.status == "cached" else f"  {result.seconds:.1f}s"
    if result.message and result.status not in ("cached", "built"):
        text += f"  ({result.message.strip().splitlines()[0][:120]})"
    return text


def _sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="onnxopt sweep",
        description="Build every variant of a pipeline with alternatives ('|': "
                    "'prune(macs=0.3|0.5|0.7),quantize'), measure accuracy or agreement, "
                    "MACs, size and latency against the original side by side, mark the "
                    "Pareto front, plot it, and with --pick write the fastest variant that "
                    "meets a constraint.",
        epilog="Exit codes: 0 ok, 1 --pick found no variant meeting it, 2 user error.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-p", "--pipeline", required=True,
                   help="pipeline with alternatives, e.g. 'prune(macs=0.3|0.5),quantize' or "
                        "'fold-bn,quantize|prune(ratio=0.3)'")
    p.add_argument("--calib", help="calibration data: .npz, folder of .npy, or random:N")
    p.add_argument("--eval", dest="eval_data",
                   help="validation data; with 'labels' the sweep compares accuracy")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="concrete shape for a dynamic input (repeatable)")
    p.add_argument("--batch-sizes", default="1,32",
                   help="batch sizes to time at, comma-separated; the first decides the "
                        "Pareto front and --pick (default 1,32)")
    p.add_argument("--rounds", type=int, default=15,
                   help="interleaved timing rounds per model and batch size (default 15)")
    p.add_argument("--out", help="folder for the variants and the report (default: "
                                 "MODEL.sweep beside the model)")
    p.add_argument("--pick", metavar="NAME=VALUE",
                   help="write the fastest variant meeting it: max-accuracy-drop=0.005 (a "
                        "fraction; 0.5%% in points) or min-agreement=0.99")
    p.add_argument("-o", "--output", help="where --pick writes its variant (default: "
                                          "MODEL.picked.onnx)")
    add_executor_options(p)
    p.add_argument("--force", action="store_true", help="rebuild every variant, cached or not")
    p.add_argument("--seed", type=int, default=0, help="seed for random data and passes")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the result")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv for debug)")
    return p


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """Run ``onnxopt sweep`` with the arguments after ``sweep``; returns the exit code."""
    def body() -> int:
        from pathlib import Path

        from onnxopt.build.executors import make_executor
        from onnxopt.build.sweep import parse_constraint, pick, run_sweep, write_outputs
        from onnxopt.build.sweep_table import format_table
        from onnxopt.cli_common import output_beside
        from onnxopt.model_io import check_writable

        args = _sweep_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        setup_logging(args.verbose, args.quiet)
        try:
            batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        except ValueError:
            raise UserError(f"--batch-sizes: expected integers such as 1,32, got "
                            f"{args.batch_sizes!r}") from None
        if args.rounds < 3:
            raise UserError(f"--rounds must be at least 3, got {args.rounds}")
        if args.pick:
            parse_constraint(args.pick)  # a typo fails before any work
        out = Path(args.out) if args.out else output_beside(args.model, ".sweep")
        pick_to = Path(args.output) if args.output else output_beside(args.model,
                                                                      ".picked.onnx")
        if args.pick:
            check_writable(pick_to)
        executor = make_executor(args.jobs, args.ray, args.ray_files)

        def progress(done: int, total: int, result: JobResult) -> None:
            if not args.quiet:
                print(f"[{done}/{total}] {result.name}  {describe(result)}", flush=True)

        result = run_sweep(args.model, args.pipeline, out, calib=args.calib,
                           eval_data=args.eval_data, input_shapes=args.input_shape,
                           batch_sizes=batches, executor=executor, force=args.force,
                           rounds=args.rounds, seed=args.seed, progress=progress,
                           verbose=args.verbose - (1 if args.quiet else 0))
        chosen, why = pick(result, args.pick) if args.pick else (None, None)
        print(format_table(result))
        written, note = write_outputs(result, out, chosen, pick_to if args.pick else None)
        if note:
            print(note)
        if why:
            print(why)
        for path in written:
            print(f"wrote {path}")
        return 1 if args.pick and chosen is None else 0

    return run_reporting_user_errors("onnxopt sweep", body)


COMMANDS = {"build": build_main, "sweep": sweep_main}
