"""BatchNormalization algebra in inference mode, shared by the passes that fold it away.

``BN(y) = scale * (y - mean) / sqrt(var + eps) + bias`` is the per-channel affine map
``g * y + h`` with ``g = scale / sqrt(var + eps)`` and ``h = bias - mean * g``. Applied after a
conv ``y = W * x + b`` (output channels on axis 0 of ``W``) it gives the conv
``W_bn = g[:, None, ...] * W`` and ``b_bn = g * b + h = (b - mean) * g + bias``.
All arithmetic is done in float64; callers cast back to the weight dtype.
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


def fold_affine_into_conv(
    weight: np.ndarray, bias: np.ndarray | None, g: np.ndarray, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a per-output-channel affine ``g * y + h`` applied after a conv into the conv.

    Args:
        weight: Conv weight ``[C_out, C_in / groups, *kernel]``.
        bias: Conv bias ``[C_out]``, or None for no bias.
        g: Per-channel multiplier, shape ``[C_out]`` or scalar.
        h: Per-channel offset, shape ``[C_out]`` or scalar.

    Returns:
        ``(weight', bias')`` in float64 with ``bias'`` of shape ``[C_out]``.
    """
    w = np.asarray(weight, np.float64)
    cout = w.shape[0]
    g = np.broadcast_to(np.asarray(g, np.float64), (cout,))
    h = np.broadcast_to(np.asarray(h, np.float64), (cout,))
    b = np.zeros(cout) if bias is None else np.asarray(bias, np.float64)
    return w * g.reshape((cout,) + (1,) * (w.ndim - 1)), b * g + h
