"""Pieces every ``onnxopt`` subcommand shares: one-line usage errors, logging, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from onnxopt.errors import UserError

EXIT_OK, EXIT_VALIDATION, EXIT_USER = 0, 1, 2
#: stdout was closed by its reader (``| head``): 128 + SIGPIPE, as a shell reports a
#: process that SIGPIPE ended.
EXIT_BROKEN_PIPE = 141


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def setup_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr as ``onnxopt: LEVEL: message``; -q shows errors only, -v/-vv more."""
    level = logging.ERROR if quiet else (
        logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnxopt: %(levelname)s: %(message)s"))
    root = logging.getLogger("onnxopt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def package_version() -> str:
    """The installed version of onnxopt (the package's own constant when not installed)."""
    try:
        return metadata.version("onnxopt")
    except metadata.PackageNotFoundError:
        from onnxopt import __version__

        return __version__


def quiet_broken_pipe() -> int:
    """Finish quietly after stdout's reader went away; returns :data:`EXIT_BROKEN_PIPE`.

    Python's documented recipe (``signal`` module, "Note on SIGPIPE"): point stdout at
    devnull, so that the interpreter's final flush does not fail again with a traceback.
    """
    with contextlib.suppress(OSError, ValueError):  # e.g. a stdout without a descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def run_reporting_user_errors(prog: str, body: Callable[[], int]) -> int:
    """Run a subcommand: user errors become one stderr line and exit 2, Ctrl-C exit 130.

    ``--help`` and ``--version`` return 0 instead of raising ``SystemExit``.
    """
    try:
        return body()
    except SystemExit as exc:  # argparse after --help/--version (its errors are UserError)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


def output_beside(model: str, suffix: str) -> Path:
    """``dir/name.onnx`` -> ``dir/name<suffix>``: the default output next to the input."""
    path = Path(model)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + suffix)
