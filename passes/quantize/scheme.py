"""Quantization arithmetic: affine parameters from ranges, int8 weights and int32 biases.

Affine quantization maps a real ``x`` to ``q = clip(rint(x / s) + z, qmin, qmax)`` and back to
``x' = (q - z) * s`` (``rint`` rounds half to even, as QuantizeLinear does).

* Activations, ``uint8`` (default): asymmetric. A range ``[a, b]`` with ``a <= 0 <= b`` gives
  ``s = (b - a) / 255`` and ``z = rint(-a / s)``, so 0 is exact (zero padding, Relu). A tensor
  that is never negative gets ``z = 0 = qmin``, which is what lets onnxruntime drop a Relu or
  Clip in front of the QuantizeLinear.
* Activations, ``int8``: symmetric, ``z = 0`` and ``s = max(|a|, |b|) / 127``; a tensor that is
  never negative instead uses the whole int8 range, ``z = -128`` and ``s = b / 255``, again so
  the Relu/Clip can be dropped (onnxruntime needs ``z == qmin`` for that).
* Weights: int8 symmetric, ``z = 0``, ``s_c = max|W_c| / 127`` per output channel ``c`` (or per
  tensor); ``reduce_range`` uses 7 bits (``/ 63``) so that u8*s8 products summed in pairs cannot
  saturate int16 on CPUs without VNNI.
* Bias: int32 with ``s_b = s_x * s_w`` (per channel) and ``z = 0``: the integer kernel adds it
  straight to its int32 accumulator ``sum (q_x - z_x) * q_w``. If ``|b / s_b|`` would not fit in
  int32 the weight scale of that channel is raised until it does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MAX = 2**31 - 1

#: Activation type -> (numpy dtype, qmin, qmax).
ACTIVATION_TYPES: dict[str, tuple[type, int, int]] = {
    "uint8": (np.uint8, 0, 255),
    "int8": (np.int8, -128, 127),
}


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor: scalars (per tensor) or 1-D along ``axis``."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.zero_point.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.zero_point.dtype).max)

    def _broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        if self.axis is None or self.scale.ndim == 0:
            return self.scale.astype(np.float64), self.zero_point.astype(np.float64)
        shape = [1] * ndim
        shape[self.axis] = -1
        return (self.scale.astype(np.float64).reshape(shape),
                self.zero_point.astype(np.float64).reshape(shape))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """``clip(rint(x / s) + z)`` in the zero point's integer type."""
        scale, zp = self._broadcast(np.ndim(x))
        q = np.rint(np.asarray(x, np.float64) / scale) + zp
        return np.clip(q, self.qmin, self.qmax).astype(self.zero_point.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``(q - z) * s`` as float32."""
        scale, zp = self._broadcast(np.ndim(q))
        return ((np.asarray(q, np.float64) - zp) * scale).astype(np.float32)


def activation_params(lo: float, hi: float, activation_type: str = "uint8") -> QuantParams:
    """Per-tensor parameters of an activation whose clipping range is ``[lo, hi]``."""
    dtype, qmin, qmax = ACTIVATION_TYPES[activation_type]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0.0 or not np.isfinite(hi - lo):
        hi = lo + 1.0  # a constant-zero tensor: any positive scale represents it exactly
    if activation_type == "uint8" or lo == 0.0:
        scale = np.float32((hi - lo) / (qmax - qmin))
        zp = qmin + int(np.clip(np.rint(-lo / float(scale)), 0, qmax - qmin))
    else:
        scale = np.float32(max(-lo, hi) / qmax)
        zp = 0
    return QuantParams(np.asarray(scale, np.float32), np.asarray(zp, dtype))


def weight_params(weight: np.ndarray, axis: int | None, reduce_range: bool = False,
                  ) -> QuantParams:
    """Symmetric int8 parameters of a weight, per channel along ``axis`` or per tensor."""
    qmax = 63 if reduce_range else 127
    # max |w| in the weight's own float type: it picks an element, so it is exact there, and
    # a float64 copy of a 400 MB weight costs seconds
    w = np.asarray(weight)
    w = np.abs(w if np.issubdtype(w.dtype, np.floating) else w.astype(np.float64))
    if axis is None:
        absmax = np.asarray(w.max() if w.size else 0.0)
    else:
        absmax = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).max(axis=1)
    scale = absmax.astype(np.float64) / qmax
    positive = scale[scale > 0] if scale.ndim else scale[None][scale[None] > 0]
    # An all-zero channel quantizes to 0 under any scale; borrow the smallest real one so
    # its int32 bias keeps a fine resolution.
    fill = positive.min() if positive.size else 1.0
    scale = np.where(scale > 0, scale, fill).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int8), axis)


def quantize_weight(weight: np.ndarray, params: QuantParams) -> np.ndarray:
    """``weight`` as int8, clipped to the symmetric range (never -128)."""
    q = params.quantize(weight)
    return np.maximum(q, -int(params.qmax)).astype(np.int8)


def bias_scale(x_scale: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """``s_x * s_w`` in float32, as the integer kernel computes it."""
    return (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)


def fit_weight_scale_to_bias(bias: np.ndarray, x_scale: np.ndarray, w_params: QuantParams,
                             ) -> QuantParams:
    """``w_params`` with a channel's scale raised where ``bias / (s_x * s_w)`` overflows int32."""
    w_scale = np.broadcast_to(w_params.scale, np.shape(bias)).astype(np.float64)
    need = np.abs(np.asarray(bias, np.float64)) / (float(x_scale) * (INT32_MAX - 1024))
    if np.all(w_scale >= need):
        return w_params
    raised = np.maximum(w_scale, need).astype(np.float32)
    if w_params.scale.ndim == 0:
        raised = np.asarray(raised.max(), np.float32)
    return QuantParams(raised, np.zeros(raised.shape, np.int8), w_params.axis)


def quantize_bias(bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The int32 bias and its scale ``s_x * s_w`` (per channel, or scalar for a scalar ``s_w``)."""
    scale = bias_scale(x_scale, w_scale)
    full = np.broadcast_to(scale, np.shape(bias)).astype(np.float64)
    q = np.rint(np.asarray(bias, np.float64) / full)
    # ascontiguousarray alone turns a 0-d scale into shape (1,), which reads as per axis.
    return (np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32),
            np.ascontiguousarray(scale).reshape(np.shape(scale)))
