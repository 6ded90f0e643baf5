"""Streaming activation statistics (tensor_stats) and range selection (ranges) of quantize."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.data import from_arrays
from onnxopt.ir import from_proto
from onnxopt.passes.quantize.ranges import RANGE_METHODS, select_range
from onnxopt.passes.quantize.tensor_stats import (
    StreamingHistogram,
    TensorStats,
    collect_activation_stats,
)
from tests.helpers import two_layer_model


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range grows both ways, so the histogram has to double up and down."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 3, 5, 5)) * (1 + i) + (-1) ** i * i).astype(np.float32)
            for i in range(8)]


def test_histogram_merges_keep_every_count_in_the_right_bin() -> None:
    hist = StreamingHistogram(256)
    data = _batches()
    for batch in data:
        hist.update(batch.ravel())
    everything = np.concatenate([b.ravel() for b in data])
    assert hist.total == everything.size
    assert hist.lo <= everything.min() and hist.hi > everything.max()
    expected, _ = np.histogram(everything, bins=hist.edges())
    # Bin edges only ever merge, so streaming equals one histogram over the final edges
    # (up to float32 rounding of values sitting on an edge).
    assert np.abs(hist.counts - expected).sum() <= 2


def test_histogram_rejects_odd_bins() -> None:
    with pytest.raises(ValueError):
        StreamingHistogram(7)


def test_tensor_stats_min_max_channels_and_mean_sample() -> None:
    stats = TensorStats("t", bins=128, channel_stats=True, mean_sample=True)
    data = [np.maximum(b, 0) for b in _batches()]
    for batch in data:
        stats.update(batch)
    everything = np.concatenate(data)
    assert stats.min == everything.min() and stats.max == everything.max()
    assert stats.samples == everything.shape[0]
    np.testing.assert_allclose(stats.channel_mean, everything.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats.zero_fraction, (everything == 0).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats.mean_sample, everything.mean(axis=0), rtol=1e-5,
                               atol=1e-6)
    # Memory does not grow with the samples: the histogram has a fixed size.
    assert stats.histogram is not None and stats.histogram.counts.shape == (128,)


def test_tensor_stats_skips_non_finite_values() -> None:
    stats = TensorStats("t")
    stats.update(np.array([[1.0, np.inf, -2.0, np.nan]], np.float32))
    assert (stats.min, stats.max) == (-2.0, 1.0)
    assert stats.histogram.total == 2


def _heavy_tailed() -> TensorStats:
    rng = np.random.default_rng(1)
    stats = TensorStats("t")
    for _ in range(4):
        x = rng.standard_normal(20000).astype(np.float32)
        x[:2] = [40.0, -35.0]  # outliers that minmax keeps and the others clip
        stats.update(x)
    return stats


@pytest.mark.parametrize("method", sorted(RANGE_METHODS))
def test_ranges_contain_zero_and_stay_inside_min_max(method: str) -> None:
    stats = _heavy_tailed()
    lo, hi = select_range(stats, method, percentile=99.9)
    assert stats.min <= lo <= 0.0 <= hi <= stats.max
    if method == "minmax":
        assert (lo, hi) == (stats.min, stats.max)
    elif method in ("percentile", "entropy"):  # outliers are clipped
        assert hi < 20.0 and lo > -20.0
    # (mse keeps 8 far outliers: clipping them would cost more squared error than it saves)
    slo, shi = select_range(stats, method, symmetric=True, percentile=99.9)
    assert slo == pytest.approx(-shi)


def test_one_sided_range_for_non_negative_data() -> None:
    stats = TensorStats("relu")
    stats.update(np.maximum(np.random.default_rng(2).standard_normal(5000), 0).astype(np.float32))
    for method in RANGE_METHODS:
        lo, hi = select_range(stats, method)
        assert lo == 0.0 and 0.0 < hi <= stats.max


def test_unknown_method() -> None:
    with pytest.raises(KeyError, match="unknown range method"):
        select_range(TensorStats("t"), "magic")


def test_collect_through_onnxruntime_matches_numpy() -> None:
    proto, w = two_layer_model()
    x = np.random.default_rng(4).standard_normal((50, 4)).astype(np.float32)
    stats = collect_activation_stats(from_proto(proto), from_arrays({"x": x}, "x"),
                                     ["x", "h", "r"], batch_size=8, channel_stats=True)
    h = x @ w
    assert stats["x"].min == x.min() and stats["x"].max == x.max()
    assert stats["h"].samples == 50
    assert stats["h"].min == pytest.approx(h.min(), rel=1e-5)
    np.testing.assert_allclose(stats["r"].zero_fraction, (np.maximum(h, 0) == 0).mean(axis=0))
