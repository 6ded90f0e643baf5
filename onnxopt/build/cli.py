"""The ``onnxopt build [RECIPE]`` and ``onnxopt sweep MODEL`` commands: parsing and printing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxopt.build.job import JobResult
from onnxopt.cli_common import OneLineParser, run_reporting_user_errors, setup_logging


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


COMMANDS = {"build": build_main}
