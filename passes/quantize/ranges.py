"""Clipping-range selection for uniform quantization, from streamed activation statistics.

Methods (:data:`RANGE_METHODS`) for a uniform quantizer with ``levels`` steps, where
a range ``[a, b]`` always contains 0 and gives ``scale = (b - a) / (levels - 1)``:

* ``minmax``: ``[min(x, 0), max(x, 0)]``.
* ``percentile``: the ``(100 - p)`` and ``p`` percentiles of the histogram (``p = 99.999``
  by default), one per tail.
* ``mse``: the candidate ``c * [a0, b0]`` (``c`` on a grid in ``(0, 1]``) minimising the
  expected squared error ``sum_inside n * scale**2 / 12 + sum_outside n * (x - edge)**2``.
* ``entropy``: the candidate minimising ``KL(P || Q)`` between the clipped histogram ``P``
  (outliers added to the edge bins) and its ``levels``-level quantization ``Q``
  (TensorRT-style calibration generalised to asymmetric ranges).

With ``symmetric=True`` the candidates are ``c * [-A, A]`` with ``A = max|x|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from onnxopt.passes.quantize.tensor_stats import StreamingHistogram, TensorStats

_GRID = 128  # candidate clipping fractions c = k / _GRID


def _base_range(stats: TensorStats, symmetric: bool) -> tuple[float, float]:
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 0.0
    if symmetric:
        a = max(-lo, hi)
        return -a, a
    return lo, hi


def _minmax(stats: TensorStats, levels: int, symmetric: bool,
            percentile: float) -> tuple[float, float]:
    return _base_range(stats, symmetric)


def _quantile(hist: StreamingHistogram, q: float) -> float:
    """Value below which a fraction ``q`` of the counts lies (linear within a bin)."""
    assert hist.counts is not None
    cdf = np.cumsum(hist.counts, dtype=np.float64)
    target = q * cdf[-1]
    k = int(np.searchsorted(cdf, target, side="left"))
    k = min(k, hist.bins - 1)
    before = cdf[k - 1] if k else 0.0
    inside = hist.counts[k]
    frac = (target - before) / inside if inside else 0.0
    return hist.lo + (k + float(np.clip(frac, 0.0, 1.0))) * hist.width


def _percentile(stats: TensorStats, levels: int, symmetric: bool,
                percentile: float) -> tuple[float, float]:
    hist = stats.histogram
    if hist is None or not hist.total:
        return _base_range(stats, symmetric)
    tail = (100.0 - percentile) / 100.0
    hi = min(max(_quantile(hist, 1.0 - tail), 0.0), max(stats.max, 0.0))
    lo = max(min(_quantile(hist, tail), 0.0), min(stats.min, 0.0)) if stats.min < 0 else 0.0
    if symmetric:
        a = max(-lo, hi)
        return -a, a
    return lo, hi


def _candidates(stats: TensorStats, levels: int, symmetric: bool,
                ) -> list[tuple[float, float]]:
    lo, hi = _base_range(stats, symmetric)
    return [(lo * k / _GRID, hi * k / _GRID) for k in range(_GRID // 16, _GRID + 1)]


def _mse_cost(hist: StreamingHistogram, lo: float, hi: float, levels: int) -> float:
    assert hist.counts is not None
    centers = hist.centers()
    counts = hist.counts.astype(np.float64)
    scale = (hi - lo) / (levels - 1)
    clipped = np.clip(centers, lo, hi)
    inside = centers == clipped
    return float(counts[inside].sum() * scale**2 / 12.0
                 + (counts[~inside] * (centers[~inside] - clipped[~inside]) ** 2).sum())


def _kl_cost(hist: StreamingHistogram, lo: float, hi: float, levels: int) -> float:
    assert hist.counts is not None
    a = int(np.clip(np.floor((lo - hist.lo) / hist.width), 0, hist.bins - 1))
    b = int(np.clip(np.ceil((hi - hist.lo) / hist.width), a + 1, hist.bins))
    n = b - a
    if n < levels:
        return math.inf
    counts = hist.counts.astype(np.float64)
    inner = counts[a:b]
    p = inner.copy()
    p[0] += counts[:a].sum()
    p[-1] += counts[b:].sum()
    chunk = (np.arange(n) * levels) // n
    nonzero = inner > 0
    chunk_total = np.bincount(chunk, weights=inner, minlength=levels)
    chunk_nonzero = np.bincount(chunk, weights=nonzero.astype(np.float64), minlength=levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(chunk_nonzero > 0, chunk_total / chunk_nonzero, 0.0)
    q = np.where(nonzero, spread[chunk], 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum <= 0 or q_sum <= 0:
        return math.inf
    p /= p_sum
    q /= q_sum
    mask = p > 0
    q_safe = np.maximum(q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_safe)))


def _search(cost: Callable[[StreamingHistogram, float, float, int], float],
            ) -> Callable[[TensorStats, int, bool, float], tuple[float, float]]:
    def select(stats: TensorStats, levels: int, symmetric: bool,
               percentile: float) -> tuple[float, float]:
        hist = stats.histogram
        if hist is None or not hist.total:
            return _base_range(stats, symmetric)
        best, best_cost = _base_range(stats, symmetric), math.inf
        for lo, hi in _candidates(stats, levels, symmetric):
            if hi - lo <= 0:
                continue
            c = cost(hist, lo, hi, levels)
            if c < best_cost:
                best, best_cost = (lo, hi), c
        return best

    return select


RangeMethod = Callable[[TensorStats, int, bool, float], tuple[float, float]]

#: Range selection method name -> function ``(stats, levels, symmetric, percentile)``.
RANGE_METHODS: dict[str, RangeMethod] = {
    "minmax": _minmax,
    "percentile": _percentile,
    "mse": _search(_mse_cost),
    "entropy": _search(_kl_cost),
}


def select_range(stats: TensorStats, method: str = "minmax", *, levels: int = 256,
                 symmetric: bool = False, percentile: float = 99.999) -> tuple[float, float]:
    """The clipping range ``[lo, hi]`` (with ``lo <= 0 <= hi``) for one tensor.

    Args:
        stats: The tensor's statistics (histogram needed except for ``minmax``).
        method: A key of :data:`RANGE_METHODS`.
        levels: Number of quantization levels (256 for 8 bits).
        symmetric: Whether the range must be symmetric around zero.
        percentile: Percentile for ``percentile``.

    Raises:
        KeyError: Unknown method.
    """
    if method not in RANGE_METHODS:
        raise KeyError(f"unknown range method {method!r}; one of {', '.join(RANGE_METHODS)}")
    lo, hi = RANGE_METHODS[method](stats, levels, symmetric, percentile)
    return min(lo, 0.0), max(hi, 0.0)
