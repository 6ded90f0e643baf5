"""The machine a benchmark ran on: CPU, int8 VNNI support, cores, load and library versions."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxopt
from onnxopt.passes.quantize.cpu import VNNI_FLAGS, cpu_flags


def machine_info() -> dict[str, Any]:
    """CPU model, int8 VNNI support, cores and library versions for the report header."""
    cpu, flags = cpu_flags() or ("", frozenset())
    cpu = cpu or platform.processor() or "unknown"
    vnni = sorted(flags & VNNI_FLAGS)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import onnx_ir

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "vnni": bool(vnni), "vnni_flags": vnni,
        "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__, "numpy": np.__version__,
        "onnxopt": onnxopt.__version__, "load_average_start": load_average(),
    }


def load_average() -> str:
    """The 1/5/15-minute load averages, or ``n/a`` where the OS has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
