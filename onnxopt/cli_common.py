"""Pieces every ``onnxopt`` subcommand shares: one-line usage errors, logging, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from onnxopt.errors import UserError

EXIT_OK, EXIT_VALIDATION, EXIT_USER = 0, 1, 2


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
