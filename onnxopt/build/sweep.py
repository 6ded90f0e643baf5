"""``onnxopt sweep``: build every variant of a pipeline, measure them side by side, find the
Pareto front of quality against latency, and pick the fastest variant meeting a constraint."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.build.build import build
from onnxopt.build.executors import Executor
from onnxopt.build.job import BUILT, CACHED, JobResult
from onnxopt.build.latency import NOISE, Latency, measure
from onnxopt.build.recipe import Entry, Recipe
from onnxopt.build.summary import figures
from onnxopt.build.variants import expand_alternatives
from onnxopt.errors import UserError

logger = logging.getLogger(__name__)

#: ``--pick`` constraints: name -> what its value means.
CONSTRAINTS: dict[str, str] = {
    "max-accuracy-drop": "top-1 accuracy below the original, a fraction as for "
                         "--max-accuracy-drop (0.005), or points with a % sign (0.5%)",
    "min-agreement": "top-1 agreement with the original, a fraction (0.99)",
}


@dataclass
class SweepRow:
    """One variant (or the original) as measured; ``latency`` is keyed by batch size."""

    label: str
    pipeline: str
    status: str
    macs: int | None = None
    bytes: int | None = None
    params: int | None = None
    accuracy: float | None = None
    agreement: float | None = None
    latency: dict[int, Latency] = field(default_factory=dict)
    pareto: bool = False
    output: str | None = None
    message: str = ""

    def quality(self, labelled: bool) -> float | None:
        """Accuracy with labelled data, else agreement with the original."""
        return self.accuracy if labelled else self.agreement


@dataclass
class SweepResult:
    """All rows, the original first, and what they were measured with."""

    model: str
    rows: list[SweepRow]
    batch_sizes: list[int]
    labelled: bool
    executor: str
    noise: dict[int, Latency] = field(default_factory=dict)

    @property
    def primary_batch(self) -> int:
        """The batch size the Pareto front and ``--pick`` use (the first one asked for)."""
        return self.batch_sizes[0]

    def candidates(self) -> list[SweepRow]:
        """Variants that were built as asked (not failed), with a latency."""
        return [r for r in self.rows[1:] if r.status in (BUILT, CACHED)
                and self.primary_batch in r.latency]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "batch_sizes": self.batch_sizes,
                "labelled": self.labelled, "executor": self.executor,
                "noise": {b: asdict(v) for b, v in self.noise.items()},
                "rows": [asdict(r) for r in self.rows]}


def run_sweep(model: str | Path, spec: str, out_dir: Path, *, calib: str | None = None,
              eval_data: str | None = None, input_shapes: Sequence[str] = (),
              batch_sizes: Sequence[int] = (1, 32), executor: Executor | None = None,
              force: bool = False, rounds: int = 15, seed: int = 0,
              progress: Callable[[int, int, JobResult], None] | None = None,
              verbose: int = -1) -> SweepResult:
    """Build every variant of ``spec`` on ``model``, then time them all against it.

    The builds run on ``executor`` (and are cached like ``onnxopt build``'s); the timing
    runs here, one model at a time, so that parallel jobs do not disturb it.
    """
    from onnxopt.cost import infer_shapes, model_cost
    from onnxopt.data import parse_input_shapes
    from onnxopt.model_io import file_size, load

    model = Path(model).resolve()
    if not model.is_file():
        raise UserError(f"no model file at {model}")
    if any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise UserError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    pipelines = expand_alternatives(spec)
    variants = out_dir / "variants"
    entries = tuple(
        Entry(name=f"v{i}", path=model, pipeline=p, output=variants / f"v{i}.onnx",
              report=variants / f"v{i}.report.json", calib=_abs(calib), eval=_abs(eval_data),
              input_shapes=tuple(input_shapes), seed=seed)
        for i, p in enumerate(pipelines, 1))
    for entry in entries:
        for value in (entry.calib, entry.eval):
            if value is not None and not value.startswith("random:") and \
                    not Path(value).exists():
                raise UserError(f"no data at {value}")
    outcome = build(Recipe(model, out_dir, entries), executor, force=force, progress=progress,
                    verbose=verbose, summaries=False)
    shapes = parse_input_shapes(input_shapes)
    cost = model_cost(infer_shapes(load(model)), shapes)
    rows = [SweepRow("original", "", "", cost.macs, file_size(model), cost.params)]
    labelled = False
    for entry, result in zip(entries, outcome.results, strict=True):
        row = SweepRow(entry.name, entry.pipeline, result.status, message=result.message)
        if result.report is not None:
            f = figures(result.report)
            row.macs, row.bytes = f["final"]["macs"], f["final"]["bytes"]
            row.params = f["final"]["params"]
            row.accuracy, row.agreement = f["accuracy"], f["agreement"]
            row.output = str(entry.output)
            if f["original_accuracy"] is not None:
                labelled = True
                rows[0].accuracy = f["original_accuracy"]
        rows.append(row)
    rows[0].agreement = 1.0
    timed = {r.label: r.output for r in rows[1:] if r.output and r.status in (BUILT, CACHED)}
    latencies = measure(timed, str(model), list(batch_sizes), rounds=rounds,
                        input_shapes=shapes)
    result = SweepResult(str(model), rows, list(batch_sizes), labelled, outcome.executor)
    for batch, by_label in latencies.items():
        result.noise[batch] = by_label.pop(NOISE)
        rows[0].latency[batch] = Latency(1.0, 1.0, 1.0, result.noise[batch].median_ms)
        for row in rows[1:]:
            if row.label in by_label:
                row.latency[batch] = by_label[row.label]
    mark_pareto(result)
    return result


def mark_pareto(result: SweepResult) -> None:
    """Mark the rows no other row beats on both quality and latency (the original included)."""
    batch = result.primary_batch
    points = [r for r in [result.rows[0], *result.candidates()]
              if r.quality(result.labelled) is not None and batch in r.latency]
    for row in points:
        q, t = row.quality(result.labelled), row.latency[batch].ratio
        row.pareto = not any(
            o is not row and o.quality(result.labelled) >= q and o.latency[batch].ratio <= t
            and (o.quality(result.labelled) > q or o.latency[batch].ratio < t)
            for o in points)


def parse_constraint(text: str) -> tuple[str, float]:
    """``max-accuracy-drop=0.005`` or ``=0.5%`` -> ``("max-accuracy-drop", 0.005)``.

    Values are fractions, as the command line's ``--max-accuracy-drop`` and
    ``--min-agreement`` take them; a ``%`` sign gives percentage points.

    Raises:
        UserError: Unknown name, a value that is not a number or not a fraction in [0, 1].
    """
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq or name not in CONSTRAINTS:
        raise UserError(f"--pick {text!r}: expected NAME=VALUE with NAME one of "
                        f"{', '.join(CONSTRAINTS)}")
    value = value.strip()
    percent = value.endswith("%")
    try:
        number = float(value.removesuffix("%")) / (100 if percent else 1)
    except ValueError:
        raise UserError(f"--pick {text!r}: {value!r} is not a number") from None
    if not 0 <= number <= 1:
        raise UserError(f"--pick {text!r}: {name} is a fraction between 0 and 1 (0.005), "
                        f"or percentage points with a % sign (0.5%)")
    return name, number


def pick(result: SweepResult, constraint: str) -> tuple[SweepRow | None, str]:
    """The fastest variant (at the primary batch size) meeting ``constraint``, and why.

    Raises:
        UserError: ``max-accuracy-drop`` without labelled data.
    """
    name, value = parse_constraint(constraint)
    original = result.rows[0]
    if name == "max-accuracy-drop":
        if not result.labelled or original.accuracy is None:
            raise UserError("--pick max-accuracy-drop needs labelled --eval data (a 'labels' "
                            "array); pick by min-agreement instead")

        def meets(r: SweepRow) -> bool:
            return r.accuracy is not None and \
                original.accuracy - r.accuracy <= value + 1e-12
    else:
        def meets(r: SweepRow) -> bool:
            return r.agreement is not None and r.agreement >= value

    batch = result.primary_batch
    fitting = sorted((r for r in result.candidates() if meets(r)),
                     key=lambda r: (r.latency[batch].ratio, r.label))
    if not fitting:
        return None, f"no variant meets {constraint}"
    best = fitting[0]
    return best, (f"{best.label} ({best.pipeline}) is the fastest meeting {constraint}: "
                  f"{best.latency[batch].ratio:.2f}x the original's latency at batch {batch}")


def write_outputs(result: SweepResult, out_dir: Path, picked: SweepRow | None,
                  pick_to: Path | None) -> tuple[list[Path], str | None]:
    """Write sweep.md, sweep.json, sweep.html and (with matplotlib) sweep.png; copy the
    picked variant. Returns the files written and a note when the plot was left out."""
    from onnxopt.build.html import sweep_page
    from onnxopt.build.plot import plot_sweep
    from onnxopt.build.sweep_table import format_table
    from onnxopt.model_io import write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(result, markdown=True)
    written = [write_text(out_dir / "sweep.md", f"# onnxopt sweep: {Path(result.model).name}"
                                                 f"\n\n{table}\n"),
               write_text(out_dir / "sweep.json", json.dumps(result.to_dict(), indent=2)),
               write_text(out_dir / "sweep.html", sweep_page(result))]
    png, note = plot_sweep(result, out_dir / "sweep.png")
    if png is not None:
        written.append(png)
    if picked is not None and pick_to is not None and picked.output is not None:
        tmp = pick_to.with_name(f".{pick_to.name}.tmp")
        shutil.copyfile(picked.output, tmp)
        tmp.replace(pick_to)
        written.append(pick_to)
    return written, note


def _abs(value: str | None) -> str | None:
    if value is None or value.startswith("random:"):
        return value
    return str(Path(value).resolve())
