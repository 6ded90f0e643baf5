"""Linear exit heads and confidence thresholds, fitted in numpy.

Idea (distillation without a training framework). At a cut tensor ``X`` of shape
``[N, C, ...]`` an exit head computes ``z = mean_spatial(X) @ W.T + b``, i.e.
GlobalAveragePool -> Flatten -> Gemm, and is confident when ``max softmax(z)`` reaches its
threshold. ``W`` and ``b`` are fitted on pooled features against targets:

- ``ridge``: on standardised features ``F`` (with a column of ones),
  ``(F'F + l2 * n * P) W = F'Y`` in closed form, where ``P`` is the identity except for the
  bias, which is not penalised; ``Y`` are logits to regress.
- ``logistic``: multinomial logistic regression on class probabilities ``Y``, L2 penalty
  ``l2``, a fixed number of Nesterov gradient steps of size ``1/L`` with
  ``L = ||F||_2^2 / (2n) + l2`` (a bound on the curvature of the cross-entropy).

The standardisation is folded back into ``W`` and ``b``. Costs follow
:mod:`onnxopt.cost`: a head costs ``C*H*W`` (GlobalAveragePool) + ``C*K`` (Gemm) +
``K`` (Softmax) MACs per sample.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

HeadKind = Literal["ridge", "logistic"]

_LOGISTIC_STEPS = 300


def pool(array: np.ndarray) -> np.ndarray:
    """Global average over every axis after the channel axis, as ``[N, C]`` float64."""
    array = np.asarray(array, dtype=np.float64)
    return array.mean(axis=tuple(range(2, array.ndim))) if array.ndim > 2 else array


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
    if kind == "ridge":
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


def choose_threshold(confidence: np.ndarray, agrees: np.ndarray, target: float) -> float | None:
    """Lowest threshold whose exiting samples agree on at least ``target`` of them.

    Returns None when no threshold lets any sample exit.
    """
    if len(confidence) == 0:
        return None
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    hits = np.cumsum(agrees[order])
    taken = np.arange(1, len(conf) + 1)
    # Only positions where the next confidence is lower are realisable thresholds.
    boundary = np.r_[conf[:-1] > conf[1:], True]
    ok = (hits >= target * taken - 1e-9) & boundary
    if not ok.any():
        return None
    return float(conf[np.flatnonzero(ok).max()])


def head_macs(shape: tuple[int | str, ...] | None, classes: int) -> int:
    """MACs of GlobalAveragePool -> Flatten -> Gemm -> Softmax on a cut tensor of ``shape``."""
    dims = [d if isinstance(d, int) else 1 for d in (shape or ())[1:]]
    pooling = math.prod(dims) if len(dims) > 1 else 0
    channels = dims[0] if dims else 0
    return pooling + channels * classes + classes
