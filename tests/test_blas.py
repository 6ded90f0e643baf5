"""numpy's OpenBLAS is held at one thread inside a decorated function, and restored after."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.blas import _openblas, blas_threads, single_blas_thread


def test_one_thread_inside_restored_after_even_on_error_and_nested() -> None:
    found = _openblas()
    assert found is not None  # numpy's wheels bundle OpenBLAS
    setter, _ = found
    setter(2)
    seen = []

    @single_blas_thread
    def inner(a: np.ndarray) -> np.ndarray:
        seen.append(blas_threads())
        return np.linalg.solve(a, np.ones(len(a)))

    @single_blas_thread
    def outer() -> np.ndarray:
        x = inner(np.eye(3) * 2.0)
        seen.append(blas_threads())  # the inner call does not restore the outer's setting
        return x

    np.testing.assert_allclose(outer(), np.full(3, 0.5))
    assert seen == [1, 1] and blas_threads() == 2

    @single_blas_thread
    def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        fails()
    assert blas_threads() == 2
