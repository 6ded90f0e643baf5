"""The latency cache: one-node timings on disk per (op signature, machine, onnxruntime, threads).

Times live in ``$ONNXOPT_LATENCY_CACHE``, else ``$XDG_CACHE_HOME/onnxopt/latency``, else
``~/.cache/onnxopt/latency``: one JSON file per op signature and machine, holding the seconds
per run at every kept-width point measured so far. A writer merges its points into what is
on disk and replaces the file atomically (a temporary file renamed over it), so concurrent
planners never read a torn file; at worst one's new points are lost and measured again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

if TYPE_CHECKING:
    from onnxopt.passes.prune.latency import NodeSpec

logger = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "LatencyMeter", "Timer", "cache_dir", "machine_key"]

CACHE_ENV = "ONNXOPT_LATENCY_CACHE"
"""Environment variable naming the latency cache folder (overrides the XDG default)."""

Timer = Callable[[Sequence[tuple[onnx.ModelProto, dict[str, np.ndarray]]]], list[float]]
"""Models with their feeds -> seconds per run of each, measured together."""


def cache_dir() -> Path:
    """The latency cache folder (``$ONNXOPT_LATENCY_CACHE``, else the XDG cache)."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxopt" / "latency"


def machine_key(threads: int) -> dict[str, object]:
    """What makes a timing valid elsewhere: CPU, onnxruntime version and threads."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "onnxruntime": ort.__version__, "threads": threads}


class LatencyMeter:
    """Seconds per run of one-node models at kept widths: from the disk cache, or measured.

    Attributes:
        measured: Points measured (not found in the cache) by this meter.
        cached: Points found in the cache.
    """

    def __init__(self, threads: int, timer: Timer, directory: Path | None = None) -> None:
        self.threads = threads
        self.timer = timer
        self.directory = cache_dir() if directory is None else directory
        self.machine = machine_key(threads)
        self.measured = 0
        self.cached = 0

    def _path(self, spec: NodeSpec) -> Path:
        key = json.dumps([spec.signature, self.machine], sort_keys=True, default=str)
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def _read(self, path: Path) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(path.read_text())["points"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _write(self, path: Path, spec: NodeSpec, points: dict[str, float]) -> None:
        """Merge ``points`` into the file and replace it atomically (a temp file renamed)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(path), **points}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"signature": spec.signature, "machine": self.machine,
                           "points": merged}, f, default=str)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache only costs the next plan its time
            logger.warning("latency cache not written (%s)", exc)

    def times(self, requests: Sequence[tuple[NodeSpec, Sequence[tuple[int, ...]]]]
              ) -> list[dict[tuple[int, ...], float]]:
        """Seconds per run of each spec at each of its kept-count points.

        The points missing from the cache are measured together, in one interleaved run.
        """
        results: list[dict[tuple[int, ...], float]] = []
        todo: list[tuple[int, tuple[int, ...]]] = []
        for r, (spec, points) in enumerate(requests):
            stored = self._read(self._path(spec))
            found = {}
            for p in dict.fromkeys(tuple(p) for p in points):
                key = ",".join(map(str, p))
                if key in stored:
                    found[p] = stored[key]
                    self.cached += 1
                else:
                    todo.append((r, p))
            results.append(found)
        if todo:
            models = [requests[r][0].build(p) for r, p in todo]
            seconds = self.timer(models)
            self.measured += len(todo)
            new: dict[int, dict[str, float]] = {}
            for (r, p), t in zip(todo, seconds, strict=True):
                results[r][p] = float(t)
                new.setdefault(r, {})[",".join(map(str, p))] = float(t)
            for r, points in new.items():
                self._write(self._path(requests[r][0]), requests[r][0], points)
        return results
