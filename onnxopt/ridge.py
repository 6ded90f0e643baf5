"""Ridge regression solved in the space of the samples, for fits with fewer rows than columns.

Prune's least-squares refits and early exit's linear heads both fit ``y ~ x W + b`` with an
L2 penalty on ``W`` (never on ``b``). When there are fewer samples ``n`` than features ``d``
(wide layers, pooled grids of many channels), the ``d x d`` normal equations cost ``d^2 n +
d^3`` while the same solution comes from an ``n x n`` system: centre ``x`` and ``y`` (the
unpenalised intercept is then the mean residual), and ``W = xc^T (xc xc^T + lam I)^-1 yc``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ridge_in_sample_space"]


def ridge_in_sample_space(x: np.ndarray, y: np.ndarray, lam: float,
                          intercept: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ridge solution of ``y ~ x W (+ b)`` from an ``n x n`` system.

    Args:
        x: Design ``[n, d]`` (float64 recommended).
        y: Targets ``[n, k]``.
        lam: Penalty on ``W`` (added to the diagonal of ``x x^T``); must be > 0 when ``n``
            exceeds the rank of ``x``.
        intercept: Fit an unpenalised intercept ``b``; without it ``b`` is zero.

    Returns:
        ``(W [d, k], b [k])``.

    Raises:
        numpy.linalg.LinAlgError: The ``n x n`` system is singular.
    """
    x_mean = x.mean(axis=0) if intercept else np.zeros(x.shape[1])
    y_mean = y.mean(axis=0) if intercept else np.zeros(y.shape[1])
    centred = x - x_mean
    kernel = centred @ centred.T
    kernel[np.diag_indices_from(kernel)] += lam
    weight = centred.T @ np.linalg.solve(kernel, y - y_mean)
    return weight, y_mean - x_mean @ weight
