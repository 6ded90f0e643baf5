"""What the CPU running onnxopt can do, where it changes what a pass should write.

onnxruntime's x86-64 int8 kernels multiply uint8 activations by int8 weights with
``VPMADDUBSW`` when the CPU has no VNNI (``avx512_vnni``, ``avx_vnni``, AMX): it adds the
products of adjacent pairs into int16 and *saturates*, so 8-bit weights (|w| up to 127 against
activations up to 255: pairs up to 64,770 > 32,767) can silently change results. VNNI
instructions accumulate in int32, and Arm's dot products do not saturate either.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

__all__ = ["VNNI_FLAGS", "cpu_flags", "int8_pairs_saturate"]

#: ``/proc/cpuinfo`` flags of instructions that accumulate u8*s8 products in int32.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, frozenset[str]] | None:
    """``(model name, flags)`` of the first CPU in ``/proc/cpuinfo`` (or the text given);
    None when there is no such file (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    return (match.group(1).strip() if match else "",
            frozenset(flags.group(1).split()) if flags else frozenset())


def int8_pairs_saturate(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """Whether onnxruntime's u8*s8 kernels on this CPU saturate pairs of 8-bit products.

    True on x86 without VNNI, and on x86 whose flags cannot be read (the safe answer);
    False elsewhere (Arm, ...).
    """
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return False
    info = cpu_flags(cpuinfo)
    return info is None or not (info[1] & VNNI_FLAGS)
