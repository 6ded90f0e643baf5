"""Where jobs run: in this process, in a local process pool, or as Ray tasks.

Every executor runs the same :func:`onnxopt.build.job.run_job` on the same jobs, so the
choice changes when and where a job runs, never its result. Results are handed to
``on_result`` as jobs finish (for the progress lines) and returned in job order.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Protocol

from onnxopt.build.job import Job, JobResult, run_job
from onnxopt.errors import UserError

logger = logging.getLogger(__name__)

OnResult = Callable[[int, JobResult], None]


class Executor(Protocol):
    """Runs jobs; ``on_result(index, result)`` is called as each one finishes."""

    description: str

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> list[JobResult]: ...


class InlineExecutor:
    """Jobs one after another in this process (``--jobs 1``)."""

    description = "in this process"

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> list[JobResult]:
        results = []
        for index, job in enumerate(jobs):
            results.append(run_job(job))
            on_result(index, results[-1])
        return results


class ProcessExecutor:
    """A pool of ``workers`` fresh Python processes (``--jobs N``, N > 1).

    The workers are spawned, not forked: onnxruntime's thread pools do not survive a fork.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.description = f"{workers} local processes"

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> list[JobResult]:
        results: list[JobResult | None] = [None] * len(jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, max(len(jobs), 1)),
                                 mp_context=context) as pool:
            pending = {pool.submit(run_job, job): index for index, job in enumerate(jobs)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    results[index] = future.result()
                    on_result(index, results[index])
        return [r for r in results if r is not None]


def make_executor(jobs: int = 1, ray: str | None = None, ray_files: str = "auto") -> Executor:
    """The executor the command line asks for.

    Args:
        jobs: Local workers (1 runs in this process); ignored with ``ray``.
        ray: None for local execution; ``"local"`` starts a Ray for the run; otherwise the
            address of a running Ray cluster (``ray://host:10001`` or ``host:6379``).
        ray_files: With Ray: ``"path"`` (workers see the same files), ``"store"`` (files
            travel through Ray's object store) or ``"auto"`` (probe the cluster).

    Raises:
        UserError: ``jobs`` < 1, or Ray is asked for and not installed.
    """
    if ray is not None:
        from onnxopt.build.ray_executor import RayExecutor

        return RayExecutor(None if ray == "local" else ray, ray_files)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    return InlineExecutor() if jobs == 1 else ProcessExecutor(jobs)
