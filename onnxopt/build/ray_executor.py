"""Jobs as Ray tasks, on a Ray started for the run or on a cluster at an address.

Files travel by path when every node sees the driver's files (a local Ray, or a cluster
on shared storage: probed by a token file that tasks spread over the nodes must read back);
otherwise the model and data go through Ray's object store, once per distinct file, and
the written model and report come back with the result. Ray is the optional extra
``onnxopt[ray]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxopt.build.job import CRASHED, Job, JobResult, run_job
from onnxopt.errors import UserError

logger = logging.getLogger(__name__)

#: Environment variables that set BLAS and OpenMP thread counts.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: A packed file or folder: (kind, relative name -> bytes).
Packed = tuple[str, dict[str, bytes]]


def import_ray() -> Any:
    """Ray, or a one-line user error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed; install the extra: "
                        "pip install 'onnxopt[ray]'") from None
    return ray


class RayExecutor:
    """Each job one Ray task (one CPU each); results are the ones a local run gives.

    Args:
        address: A running cluster's address, or None to start a local Ray for the run.
        files: ``"path"``, ``"store"`` or ``"auto"`` (see the module docstring).
    """

    def __init__(self, address: str | None, files: str = "auto") -> None:
        if files not in ("auto", "path", "store"):
            raise UserError(f"--ray-files must be auto, path or store, got {files!r}")
        self.ray = import_ray()
        self.address = address
        self.files = files
        self.description = (f"Ray cluster at {address}" if address else "a local Ray") + \
            ("" if files == "auto" else f", files by {files}")

    def run(self, jobs: Sequence[Job], on_result: Any) -> list[JobResult]:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING,
                                      "log_to_driver": False, "configure_logging": True}
            if self.address is None:
                # "local" starts a Ray of our own even when the machine's last `ray start`
                # left its address behind (ray.init() would try to join that, dead or not)
                kwargs.update(address="local", num_cpus=os.cpu_count() or 1,
                              include_dashboard=False)
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"reach a Ray cluster at {self.address}" if self.address else \
                    "start a local Ray"
                raise UserError(f"--ray: cannot {where}: "
                                f"{' '.join(str(exc).split())[:200]}") from None
        try:
            by_path = self._shared_storage(jobs)
            self.description += "" if self.files != "auto" else \
                (", files by path" if by_path else ", files through the object store")
            return self._run(jobs, on_result, by_path)
        finally:
            if started:
                ray.shutdown()

    def _shared_storage(self, jobs: Sequence[Job]) -> bool:
        if self.files != "auto" or not jobs:
            return self.files == "path"
        if self.address is None:
            return True
        folder = jobs[0].entry.output.parent
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        probe = folder / f".onnxopt-probe-{token[:8]}"
        probe.write_text(token)
        try:
            nodes = max(1, sum(1 for n in self.ray.nodes() if n.get("Alive")))
            task = self.ray.remote(num_cpus=0.01, scheduling_strategy="SPREAD")(_sees)
            seen = self.ray.get([task.remote(str(probe), token) for _ in range(2 * nodes)])
        finally:
            probe.unlink(missing_ok=True)
        logger.info("Ray: %d of %d probes saw the driver's files", sum(seen), len(seen))
        return all(seen)

    def _run(self, jobs: Sequence[Job], on_result: Any, by_path: bool) -> list[JobResult]:
        ray = self.ray
        refs: dict[Any, int] = {}
        # Ray gives a one-CPU task one BLAS thread; the BLAS thread count changes the last
        # bits of least-squares refits (prune), so tasks get the threads a local run has.
        options = {"num_cpus": 1, "max_retries": 0,
                   "runtime_env": {"env_vars": blas_threads()}}
        if by_path:
            task = ray.remote(**options)(run_job)
            for index, job in enumerate(jobs):
                refs[task.remote(job)] = index
        else:
            task = ray.remote(**options)(run_stored_job)
            stored: dict[str, Any] = {}  # one object per distinct file, shared by the jobs
            for index, job in enumerate(jobs):
                roles = _inputs(job)
                for path in roles.values():
                    if path not in stored:
                        stored[path] = ray.put(pack(Path(path), model=path == str(job.entry.path)))
                refs[task.remote(job, list(roles), *(stored[p] for p in roles.values()))] = index
        results: list[JobResult | None] = [None] * len(jobs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            index = refs[done[0]]
            try:
                result = ray.get(done[0])
            except Exception as exc:  # the task or its worker died: report it, go on
                result = JobResult(jobs[index].entry.name, CRASHED, 0.0,
                                   f"Ray task failed: {' '.join(str(exc).split())[:500]}")
            if result.files:
                _unpack_outputs(jobs[index], result)
            results[index] = result
            on_result(index, result)
        return [r for r in results if r is not None]


def blas_threads() -> dict[str, str]:
    """The BLAS/OpenMP thread settings of this process, made explicit for Ray's workers."""
    count = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
    return {name: os.environ.get(name, count) for name in BLAS_THREAD_VARIABLES}


def _sees(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def _inputs(job: Job) -> dict[str, str]:
    entry = job.entry
    roles = {"model": str(entry.path)}
    for role, value in (("calib", entry.calib), ("eval", entry.eval)):
        if value is not None and not value.startswith("random:"):
            roles[role] = value
    return roles


def pack(path: Path, *, model: bool = False) -> Packed:
    """A file (with a model's external-data files) or a folder as bytes for the store."""
    from onnxopt.build.cache import _external_data

    if path.is_dir():
        return "dir", {p.relative_to(path).as_posix(): p.read_bytes()
                       for p in sorted(path.rglob("*")) if p.is_file()}
    files = {path.name: path.read_bytes()}
    for extra in _external_data(path) if model else []:
        files[extra.name] = extra.read_bytes()
    return "file:" + path.name, files


def _materialize(packed: Packed, folder: Path) -> Path:
    kind, files = packed
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder if kind == "dir" else folder / kind.split(":", 1)[1]


def run_stored_job(job: Job, roles: list[str], *packed: Packed) -> JobResult:
    """Run ``job`` on files that came through the object store; return its outputs' bytes."""
    entry = job.entry
    with tempfile.TemporaryDirectory(prefix="onnxopt-job-") as tmp:
        local = {role: str(_materialize(p, Path(tmp) / role)) for role, p in
                 zip(roles, packed, strict=True)}
        out = Path(tmp) / "out"
        out.mkdir()
        (Path(tmp) / "report").mkdir()
        moved = dataclasses.replace(
            entry, path=Path(local["model"]), calib=local.get("calib", entry.calib),
            eval=local.get("eval", entry.eval), output=out / entry.output.name,
            report=Path(tmp) / "report" / entry.report.name)
        result = run_job(dataclasses.replace(job, entry=moved,
                                             output_label=str(entry.output)))
        if result.report is not None:
            # the report names the driver's files, not this task's copies of them
            text = moved.report.read_text(encoding="utf-8")
            original = _inputs(job)
            for role, path in local.items():
                text = text.replace(json.dumps(path)[1:-1], json.dumps(original[role])[1:-1])
            result.report = json.loads(text)
            result.files = {"report": text.encode()}
            for item in sorted(out.iterdir()):
                result.files[f"output/{item.name}"] = item.read_bytes()
    return result


def _unpack_outputs(job: Job, result: JobResult) -> None:
    """Write what a store-mode task sent back, atomically, where the entry wants it."""
    from onnxopt.model_io import write_text

    entry = job.entry
    entry.output.parent.mkdir(parents=True, exist_ok=True)
    for name, data in result.files.items():
        if not name.startswith("output/"):
            continue
        dest = entry.output.parent / name.split("/", 1)[1]
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    write_text(entry.report, result.files["report"].decode())
    result.files = {}
