"""Linear exit heads and their calibrated confidence, fitted in numpy.

Idea (distillation without a training framework). At a cut tensor ``X`` of shape
``[N, C, H, W]`` an exit head computes ``z = pool(X) @ W.T + b``. The pooling is ``avg``
(GlobalAveragePool, ``C`` features) or ``grid`` (the mean of each quadrant, a 2x2
AveragePool, ``4C`` features: where on the image a channel fires), falling back to ``avg``
when ``H`` or ``W`` is odd. ``W`` and ``b`` are fitted on pooled features against targets:

- ``ridge``: on standardised features ``F`` (with a column of ones),
  ``(F'F + l2 * n * P) W = F'Y`` in closed form, where ``P`` is the identity except for the
  bias, which is not penalised; ``Y`` are logits to regress.
- ``logistic``: multinomial logistic regression on class probabilities ``Y``, L2 penalty
  ``l2``, a fixed number of Nesterov gradient steps of size ``1/L`` with
  ``L = ||F||_2^2 / (2n) + l2`` (a bound on the curvature of the cross-entropy).

The standardisation is folded back into ``W`` and ``b``.

Confidence. The score of a head is the margin between its top two logits divided by a
temperature ``T`` fitted on out-of-fold logits (the ``T`` minimising the cross-entropy of
``softmax(z / T)`` against the full model's class), so that one level means about the same
certainty at every exit. In ONNX: TopK(2) -> MatMul with ``[1, -1]`` (the raw margin), compared
with the exit's threshold ``level * T``. Costs follow :mod:`onnxopt.cost`: a head costs
``C*H*W`` (pooling) + ``F*K`` (Gemm on ``F`` features) + ``K + 2`` (TopK, margin) MACs per sample.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from onnxopt.ridge import ridge_in_sample_space

HeadKind = Literal["ridge", "logistic"]
PoolKind = Literal["avg", "grid"]

_LOGISTIC_STEPS = 300

#: Temperatures tried when calibrating a head's margin.
_TEMPERATURES = np.geomspace(0.05, 20.0, 121)


def pooling(shape: tuple[int | str, ...] | None, kind: PoolKind) -> str:
    """The pooling a head on a cut of ``shape`` uses: ``none`` (rank 2), ``avg`` or ``grid``."""
    dims = list(shape or ())[2:]
    if not dims:
        return "none"
    if kind == "grid" and len(dims) == 2 and all(isinstance(d, int) and d >= 2 and d % 2 == 0
                                                 for d in dims):
        return "grid"
    return "avg"


def pool(array: np.ndarray, kind: str = "avg") -> np.ndarray:
    """Pooled features ``[N, F]`` (float64) of a cut tensor, for a :func:`pooling` kind."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim <= 2 or kind == "none":
        return array.reshape(len(array), -1)
    if kind == "grid":
        n, c, h, w = array.shape
        return array.reshape(n, c, 2, h // 2, 2, w // 2).mean(axis=(3, 5)).reshape(n, 4 * c)
    return array.mean(axis=tuple(range(2, array.ndim)))


def margin(z: np.ndarray) -> np.ndarray:
    """Top logit minus the second, per row (as the ONNX head computes it, in float32)."""
    z = np.asarray(z, dtype=np.float32)
    if z.shape[1] < 2:
        return np.full(len(z), np.inf, dtype=np.float32)
    top2 = -np.partition(-z, 1, axis=1)[:, :2]
    return (top2[:, 0] - top2[:, 1]).astype(np.float32)


def fit_temperature(z: np.ndarray, classes: np.ndarray, smoothing: float = 0.01) -> float:
    """Temperature minimising the cross-entropy of ``softmax(z / T)`` against ``classes``.

    The targets are smoothed (``1 - smoothing`` on the class, the rest spread evenly): with a
    head that makes no out-of-fold mistake the plain cross-entropy falls as ``T -> 0``, and
    the margins of such a head would be blown up without bound.
    """
    k = z.shape[1]
    targets = np.full(z.shape, smoothing / k)
    targets[np.arange(len(z)), classes] += 1.0 - smoothing
    best, best_t = np.inf, 1.0
    for t in _TEMPERATURES:
        loss = -np.mean(np.sum(targets * np.log(softmax(z / t) + 1e-300), axis=1))
        if loss < best:
            best, best_t = loss, float(t)
    return best_t


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_head(features: np.ndarray, targets: np.ndarray, kind: HeadKind = "ridge",
             l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Fit a linear head ``features @ W.T + b``; returns ``(W [K, C], b [K])`` as float32.

    Args:
        features: Pooled features ``[n, C]``.
        targets: ``[n, K]``: logits to regress (ridge) or class probabilities (logistic).
        kind: ``ridge`` or ``logistic`` (see the module docstring).
        l2: Penalty strength, relative to the number of samples.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-8] = 1.0
    z = np.c_[(x - mean) / std, np.ones(len(x))]
    n, d = z.shape
    penalty = np.r_[np.ones(d - 1), 0.0]
    if kind == "ridge" and n < d - 1:
        # Fewer samples than features (a wide cut, a 2x2 pool of many channels): the same
        # ridge solution in the space of the samples, n x n instead of d x d. The features
        # are centred, so the unpenalised bias is the mean target and drops out.
        weight, intercept = ridge_in_sample_space(z[:, :-1], y, l2 * n)
        w = np.r_[weight, intercept[None]]
    elif kind == "ridge":
        w = np.linalg.solve(z.T @ z + l2 * n * np.diag(penalty), z.T @ y)
    elif kind == "logistic":
        w = _logistic(z, y, l2, penalty)
    else:
        raise ValueError(f"unknown head kind {kind!r}")
    weight = w[:-1] / std[:, None]
    bias = w[-1] - (mean / std) @ w[:-1]
    return weight.T.astype(np.float32), bias.astype(np.float32)


def _logistic(z: np.ndarray, p: np.ndarray, l2: float, penalty: np.ndarray) -> np.ndarray:
    """Nesterov gradient descent on the L2-penalised multinomial cross-entropy."""
    n = len(z)
    lipschitz = np.linalg.norm(z, 2) ** 2 / (2 * n) + l2
    w = np.zeros((z.shape[1], p.shape[1]))
    v, t = w.copy(), 1.0
    for _ in range(_LOGISTIC_STEPS):
        grad = z.T @ (softmax(z @ v) - p) / n + l2 * penalty[:, None] * v
        w_next = v - grad / lipschitz
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v = w_next + (t - 1) / t_next * (w_next - w)
        w, t = w_next, t_next
    return w


def head_macs(shape: tuple[int | str, ...] | None, classes: int, kind: str = "avg") -> int:
    """MACs of pooling -> Flatten -> Gemm -> TopK -> margin on a cut tensor of ``shape``."""
    dims = [d if isinstance(d, int) else 1 for d in (shape or ())[1:]]
    pooled = math.prod(dims) if len(dims) > 1 else 0
    channels = dims[0] if dims else 0
    features = channels * (4 if kind == "grid" else 1)
    return pooled + features * classes + classes + 2
