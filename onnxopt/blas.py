"""The thread count of numpy's BLAS, held at one around the planners' many small solves.

The planners (prune's refits and channel orders) alternate onnxruntime runs, which use every
core, with thousands of small matrix products and solves (a few hundred rows and columns).
OpenBLAS threads wait for each other by spinning, so on a machine whose cores are busy (other
processes, or onnxruntime's own threads still spinning after a run) a two-thread solve of a
384 x 384 system took 55 ms where one thread took 5 ms. :func:`single_blas_thread` holds
numpy's OpenBLAS at one thread while a function runs. It finds OpenBLAS the way numpy's wheels
bundle it; with another BLAS (MKL, Accelerate) or none found it changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["blas_threads", "single_blas_thread"]

F = TypeVar("F", bound=Callable[..., Any])

#: Names of OpenBLAS's thread-count setter and getter in the builds numpy ships.
_SYMBOLS = [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads")]

_lock = threading.Lock()
_depth = 0
_saved = 0


@functools.cache
def _openblas() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """OpenBLAS's (set, get) thread-count functions as numpy loaded them, or None."""
    root = os.path.dirname(np.__file__)
    patterns = [os.path.join(root, os.pardir, "numpy.libs", "*openblas*"),
                os.path.join(root, ".dylibs", "*openblas*")]
    for path in sorted(p for pattern in patterns for p in glob.glob(pattern)):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same library
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                return setter, getter
    logger.debug("numpy's OpenBLAS not found: BLAS threads are left as they are")
    return None


def blas_threads() -> int | None:
    """The number of threads numpy's OpenBLAS uses now (None: not found)."""
    found = _openblas()
    return None if found is None else int(found[1]())


@contextmanager
def _one_thread() -> Iterator[None]:
    global _depth, _saved
    found = _openblas()
    if found is None:
        yield
        return
    setter, getter = found
    with _lock:
        if _depth == 0:
            _saved = int(getter())
            setter(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                setter(_saved)


def single_blas_thread(function: F) -> F:
    """Decorate ``function`` to run with numpy's OpenBLAS held at one thread (nests)."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _one_thread():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
