"""BatchNormalization algebra in inference mode, shared by the passes that fold it away.

``BN(y) = scale * (y - mean) / sqrt(var + eps) + bias`` is the per-channel affine map
``g * y + h`` with ``g = scale / sqrt(var + eps)`` and ``h = bias - mean * g``. Applied after a
linear op ``y = W * x + b`` it gives ``W_bn = g * W`` (scaled per output channel, see
:mod:`onnxopt.layouts`) and ``b_bn = g * b + h``. All arithmetic is done in float64; callers
cast back to the weight dtype.
"""

from __future__ import annotations

import numpy as np


def bn_affine(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine map ``(g, h)`` of an inference-mode BatchNormalization.

    Args:
        scale: BN scale (gamma), shape ``[C]``.
        bias: BN bias (beta), shape ``[C]``.
        mean: Running mean, shape ``[C]``.
        var: Running variance, shape ``[C]``.
        epsilon: The ``epsilon`` attribute.

    Returns:
        ``(g, h)`` in float64 such that ``BN(y) = g * y + h`` per channel.
    """
    g = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(epsilon))
    h = np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * g
    return g, h
