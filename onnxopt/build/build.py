"""``onnxopt build``: every entry of a recipe, skipping the unchanged, then one summary."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxopt.build.cache import cached_result, entry_key
from onnxopt.build.executors import Executor, InlineExecutor
from onnxopt.build.job import CACHED, EXIT_FOR, Job, JobResult
from onnxopt.build.recipe import Recipe

logger = logging.getLogger(__name__)

#: ``progress(done, total, result)`` after each entry, cached ones included.
Progress = Callable[[int, int, JobResult], None]


@dataclass
class BuildOutcome:
    """The results of a build, in recipe order, and the summary files written."""

    recipe: Recipe
    results: list[JobResult]
    executor: str
    summary_paths: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2 if any entry had a user error, else 1 if any missed a gate or crashed, else 0."""
        codes = {EXIT_FOR[r.status] for r in self.results}
        return 2 if 2 in codes else 1 if 1 in codes else 0


def build(recipe: Recipe, executor: Executor | None = None, *, force: bool = False,
          progress: Progress | None = None, verbose: int = -1,
          summaries: bool = True) -> BuildOutcome:
    """Build every entry of ``recipe`` whose content hash changed (all with ``force``).

    Each entry writes its model and JSON report (atomically, as ``onnxopt`` does); a failed
    entry does not stop the others. Then ``summary.md`` and ``summary.html`` are written
    into the recipe's ``out_dir``.

    Args:
        recipe: A recipe from :func:`onnxopt.build.recipe.load_recipe`.
        executor: Where jobs run (default: in this process, one after another).
        force: Rebuild every entry, cached or not.
        progress: Called after each entry.
        verbose: Logging level of the jobs (-1 errors only, 0 warnings, 1 info, 2 debug).
        summaries: False writes no summary (``onnxopt sweep`` writes its own).

    Returns:
        The outcome; ``outcome.exit_code`` is what the command exits with.
    """
    from onnxopt.build.summary import write_summaries

    executor = executor or InlineExecutor()
    entries = recipe.entries
    total, done = len(entries), 0
    results: list[JobResult | None] = [None] * total
    jobs: list[Job] = []
    positions: list[int] = []
    for index, entry in enumerate(entries):
        key = entry_key(entry)
        report = None if force else cached_result(entry, key)
        if report is not None:
            results[index] = JobResult(entry.name, CACHED, 0.0, "unchanged since its last "
                                       "build", report)
            done += 1
            if progress:
                progress(done, total, results[index])
        else:
            for folder in {entry.output.parent, entry.report.parent}:
                folder.mkdir(parents=True, exist_ok=True)
            jobs.append(Job(entry, key, verbose=verbose))
            positions.append(index)

    def finished(job_index: int, result: JobResult) -> None:
        nonlocal done
        done += 1
        results[positions[job_index]] = result
        if progress:
            progress(done, total, result)

    if jobs:
        executor.run(jobs, finished)
    outcome = BuildOutcome(recipe, [r for r in results if r is not None], executor.description)
    if summaries:
        outcome.summary_paths = write_summaries(outcome)
    return outcome
