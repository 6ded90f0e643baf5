"""One optimizer or peer run in a fresh process: its wall time, peak memory and report."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import peers

import onnxopt

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Imported once by the fork server, so each job starts in milliseconds.
_PRELOAD = ["numpy", "onnx", "onnx_ir", "onnxruntime", "onnxruntime.quantization", "onnxopt",
            "onnxopt.passes", "latency", "peers", "jobs"]


def _rss_bytes() -> int:
    try:
        import psutil
    except ImportError:  # psutil is a bench extra; Linux has the number in /proc
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRss:
    """Peak resident memory of this process inside a ``with`` block, above the RSS at entry.

    Exact where Linux allows resetting the high-water mark (``/proc/self/clear_refs``
    then ``VmHWM``); otherwise a thread samples RSS every 5 ms (psutil).
    """

    def __enter__(self) -> PeakRss:
        self.before = _rss_bytes()
        self.samples: list[int] = [self.before]
        self._stop = threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _vm_hwm_bytes()
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "psutil RSS sampled every 5 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.samples.append(_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = _vm_hwm_bytes()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.samples)

    @property
    def delta_mb(self) -> float:
        """Peak RSS above the RSS at entry, in MiB."""
        return (self.peak - self.before) / 2**20


def _worker(job: dict[str, Any], conn: Any) -> None:
    """Run one optimizer or peer job and send back its timing, memory and report."""
    result: dict[str, Any] = {"ok": False}
    try:
        onnxopt.registered_passes()  # imports happen outside the timed block
        if job["kind"] == "peer":
            peers.get_peer(job["peer"]).import_modules()
        with PeakRss() as mem:
            start = time.perf_counter()
            if job["kind"] == "onnxopt":
                _, report = onnxopt.optimize(
                    job["model"], job["spec"], calib=job["calib"], eval=job["eval"],
                    output=job["output"])
                result["report"] = json.loads(report.to_json())
                result["status"] = _status(report)
            else:
                result["note"] = peers.run_peer(job["peer"], job["model"], job["output"],
                                                job["calib"])
                result["status"] = "ok"
            result["wall_s"] = time.perf_counter() - start
        result.update(ok=True, peak_rss_mb=mem.delta_mb, memory_method=mem.method)
    except BaseException as exc:  # reported as the row's status; the harness carries on
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        result["traceback"] = traceback.format_exc()
    conn.send(result)
    conn.close()


def _status(report: onnxopt.RunReport) -> str:
    if report.failures:
        return "; ".join(f"{r.name} {r.status}" for r in report.failures)
    unchanged = [r.name for r in report.records if r.status == "unchanged"]
    if len(unchanged) == len(report.records):
        return "unchanged"
    return "ok" + (f" ({', '.join(unchanged)} unchanged)" if unchanged else "")


def _job_context() -> multiprocessing.context.BaseContext:
    """Fork-server processes on Linux (a clean parent that only imported the libraries);
    spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    # The fork server imports the preloads with its own sys.path (Python 3.11 passes it
    # neither ours nor the main script), so the checkout goes in through the environment.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    missing = [p for p in (str(ROOT), str(HERE)) if p not in paths]
    os.environ["PYTHONPATH"] = os.pathsep.join([*missing, *paths])
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one job in a fresh process that holds none of the benchmark's memory.

    Args:
        job: ``kind`` (``onnxopt`` or ``peer``), ``model``, ``output`` and ``calib`` paths;
            ``spec`` and ``eval`` for onnxopt, ``peer`` (its label) for a peer.
        timeout: Seconds to wait for the result.

    Returns:
        ``ok``; on success ``status``, ``wall_s``, ``peak_rss_mb``, ``memory_method`` and
        the run's ``report`` (onnxopt) or ``note`` (peer); on failure ``error`` and, when the
        worker caught it, ``traceback``.
    """
    ctx = _job_context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(job, child))
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            return parent.recv()
        return {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    except EOFError:
        return {"ok": False, "error": f"worker died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
