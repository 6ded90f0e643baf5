"""One corpus run through the Python API, fed one sample per session call (as an iterable of
feed dicts), for models whose inputs are not batch-first (silero's state, its 0-d sample rate).

A cross-check of the command line's ``.npz`` path, which finds each input's sample axis from
the model. Exit codes follow the CLI's: 0 ok, 1 a gate was missed, 2 a user error (one line).

    python benchmarks/corpus/api_run.py NAME MODEL SPEC OUT REPORT EVAL.npz [CALIB.npz]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.corpus.check import batches  # noqa: E402
from benchmarks.corpus.models import by_name  # noqa: E402


def _feeds(name: str, path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return batches(by_name()[name], arrays, 1)


def main(argv: list[str]) -> int:
    """Optimize with the API, write the model and the report's JSON; the CLI's exit code."""
    import onnxopt
    from onnxopt.cli_common import run_reporting_user_errors
    from onnxopt.data import parse_input_shapes
    from onnxopt.model_io import write_text

    name, model, spec, out, report_path, eval_path, *calib = argv
    entry = by_name()[name]

    def body() -> int:
        _, report = onnxopt.optimize(
            model, spec, eval=_feeds(name, eval_path),
            calib=_feeds(name, calib[0]) if calib else None, output=out,
            input_shapes=parse_input_shapes(entry.input_shapes))
        write_text(report_path, report.to_json())
        print(report.format_table())
        return 1 if any(r.status is onnxopt.Status.GATE_FAILED for r in report.failures) else 0

    return run_reporting_user_errors("onnxopt", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
