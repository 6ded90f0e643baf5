"""One build job: optimize one model as an entry says, write its model and JSON report.

A job is plain data (picklable, so any executor can ship it), and :func:`run_job` is the
only thing an executor runs. It never raises for a problem of the entry: the result says
``built``, ``gate missed``, ``error`` (a user error, exit 2) or ``crashed`` (a bug).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.build.recipe import Entry

logger = logging.getLogger(__name__)

BUILT, CACHED, GATE_MISSED, ERROR, CRASHED = "built", "cached", "gate missed", "error", "crashed"
#: Exit code each status contributes (the run exits with the largest, 2 before 1).
EXIT_FOR = {BUILT: 0, CACHED: 0, GATE_MISSED: 1, CRASHED: 1, ERROR: 2}


@dataclass
class Job:
    """Everything a worker needs to build one entry.

    Attributes:
        entry: The recipe entry (its paths are where the worker reads and writes).
        key: The entry's cache key, recorded in the report when the build succeeds.
        verbose: Logging level of the worker (as ``-v`` counts; -1 for errors only).
        output_label: The output path the report names (the worker may write elsewhere
            when files travel through an object store).
    """

    entry: Entry
    key: str
    verbose: int = -1
    output_label: str | None = None


@dataclass
class JobResult:
    """What became of one job; ``report`` is the JSON report as a dict (None on errors)."""

    name: str
    status: str
    seconds: float
    message: str = ""
    report: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_FOR[self.status]


def run_job(job: Job) -> JobResult:
    """Build one entry: ``optimize`` with its data and gates, write model and report."""
    from onnxopt.cli_common import setup_logging
    from onnxopt.errors import UserError

    setup_logging(max(job.verbose, 0), quiet=job.verbose < 0)
    entry, start = job.entry, time.perf_counter()
    try:
        report = _build(job)
    except UserError as exc:
        return JobResult(entry.name, ERROR, time.perf_counter() - start, str(exc))
    except Exception as exc:  # a bug: keep the traceback for the summary, build the others
        logger.error("%s: crashed: %s", entry.name, exc, exc_info=job.verbose > 0)
        text = traceback.format_exc(limit=-3)
        return JobResult(entry.name, CRASHED, time.perf_counter() - start,
                         f"{type(exc).__name__}: {exc}\n{text}")
    status, message = _status(report)
    return JobResult(entry.name, status, time.perf_counter() - start, message, report)


def _build(job: Job) -> dict[str, Any]:
    from onnxopt.api import optimize
    from onnxopt.build.cache import file_digest, versions
    from onnxopt.data import parse_input_shapes
    from onnxopt.model_io import check_model, check_writable, load, write_text

    entry = job.entry
    for path in (entry.output, entry.report):
        check_writable(path)
    gates = entry.gates
    model = load(entry.path)
    check_model(model, str(entry.path))
    _, report = optimize(
        model, entry.pipeline, calib=entry.calib, eval=entry.eval, output=entry.output,
        min_agreement=gates.get("min_agreement"),
        max_accuracy_drop=gates.get("max_accuracy_drop"), min_sqnr_db=gates.get("min_sqnr"),
        quality_floor=gates.get("quality_floor", True),
        input_shapes=parse_input_shapes(entry.input_shapes), batch_size=entry.batch_size,
        max_samples=entry.max_samples, seed=entry.seed, cast_inputs=entry.cast_inputs)
    data = report.to_dict()
    data["output_path"] = job.output_label or str(entry.output)
    failed = bool(report.failures) and (
        gates.get("strict", False) or any(r.status.value != "rolled back"
                                          for r in report.failures))
    data["build"] = {
        "name": entry.name, "model": str(entry.path), "pipeline": entry.pipeline,
        "gates": dict(entry.gates), "versions": versions(),
        # a failed build records no key, so the next run builds it again
        "key": None if failed else job.key,
        "output_sha256": file_digest(Path(entry.output)),
    }
    text = json.loads(report.to_json())  # the report's own cleaning of NaN and numpy
    text.update({"output_path": data["output_path"], "build": data["build"]})
    write_text(entry.report, json.dumps(text, indent=2))
    return text


def _status(report: dict[str, Any]) -> tuple[str, str]:
    """Built, or gate missed (a missed gate, a crashed pass, a rollback under ``strict``)."""
    if report["build"]["key"] is not None:
        return BUILT, ""
    order = ("gate failed", "crashed", "rolled back")
    missed = sorted((p for p in report["passes"] if p["status"] in order),
                    key=lambda p: order.index(p["status"]))
    first = missed[0]
    return GATE_MISSED, f"pass {first['name']} {first['status']}: {first['message']}"
