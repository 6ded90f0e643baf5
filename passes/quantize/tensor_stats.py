"""Streaming activation statistics over calibration feeds, computed in onnxruntime.

Statistics are gathered in onnxruntime: the wanted intermediate tensors are made extra graph
outputs of a copy of the model, the copy runs batch by batch, and every batch is folded into
fixed-size per-tensor accumulators and then dropped, so memory depends on the batch size and
the number of tensors, never on the number of samples; the batch is made smaller where the
tensors of one batch would take more than :data:`onnxopt.session.BATCH_BYTES`.

Per tensor (:class:`TensorStats`): exact running min/max; a histogram of ``bins`` bins over
``[lo, lo + bins * width)`` (:class:`StreamingHistogram`); optionally per-channel sums and
zero counts (mean activation, APoZ) and the mean over the batch axis (the "mean sample").

Histogram algebra: bins never move, they only merge. When a batch falls outside the covered
range the width doubles and adjacent bin pairs merge, extending the range up
(``lo`` fixed) or down (``lo -= bins * width``) until the batch fits. Old bin edges are a subset
of the new ones, so no count is ever re-interpolated: the streamed histogram equals a one-shot
histogram of all the values over its final bin edges.

Clipping ranges are chosen from these statistics by :mod:`.ranges`; the tensors are streamed
by :func:`onnxopt.session.stream_tensors`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.session import batch_within, stream_tensors

logger = logging.getLogger(__name__)

DEFAULT_BINS = 2048


class StreamingHistogram:
    """A fixed number of equal-width bins whose width only ever doubles (see module docstring).

    Args:
        bins: Number of bins (even).
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.counts: np.ndarray | None = None
        self.lo = 0.0
        self.width = 0.0

    @property
    def hi(self) -> float:
        """Upper end of the covered range."""
        return self.lo + self.bins * self.width

    @property
    def total(self) -> int:
        """Number of values counted."""
        return 0 if self.counts is None else int(self.counts.sum())

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges."""
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def centers(self) -> np.ndarray:
        """The bin centres."""
        return self.lo + self.width * (np.arange(self.bins, dtype=np.float64) + 0.5)

    def update(self, values: np.ndarray, vmin: float | None = None,
               vmax: float | None = None) -> None:
        """Count finite ``values`` (``vmin``/``vmax`` may be passed if already known)."""
        if values.size == 0:
            return
        vmin = float(values.min()) if vmin is None else vmin
        vmax = float(values.max()) if vmax is None else vmax
        if self.counts is None:
            lo, hi = min(vmin, 0.0), max(vmax, 0.0)
            span = hi - lo
            if span <= 0.0:
                span = 1e-6
            self.counts = np.zeros(self.bins, np.int64)
            self.lo = lo
            # A hair wider than the data so vmax lands inside the last bin.
            self.width = span * (1.0 + 1e-6) / self.bins
        while vmax >= self.hi:
            self._double(upward=True)
        while vmin < self.lo:
            self._double(upward=False)
        # float32 is exact enough for a bin index (relative error ~1e-7 of 2048 bins).
        scaled = (values.astype(np.float32, copy=False) - np.float32(self.lo)) * np.float32(
            1.0 / self.width)
        index = np.clip(scaled, 0, self.bins - 1).astype(np.intp)
        self.counts += np.bincount(index.ravel(), minlength=self.bins)

    def _double(self, upward: bool) -> None:
        assert self.counts is not None
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        counts = np.zeros_like(self.counts)
        half = self.bins // 2
        if upward:
            counts[:half] = merged
        else:
            counts[half:] = merged
            self.lo -= self.bins * self.width
        self.counts = counts
        self.width *= 2.0


class TensorStats:
    """Running statistics of one tensor over all calibration batches.

    Args:
        name: Tensor name.
        bins: Histogram bins (0 for no histogram).
        channel_stats: Keep per-channel sums and zero counts (axis ``channel_axis``).
        mean_sample: Keep the sum over the batch axis (the mean sample).
        channel_axis: Channel axis for ``channel_stats`` and ``channel_abs_max``.
        channel_abs_max: Keep the largest ``|x|`` per channel.
    """

    def __init__(self, name: str, bins: int = DEFAULT_BINS, channel_stats: bool = False,
                 mean_sample: bool = False, channel_axis: int = 1,
                 channel_abs_max: bool = False) -> None:
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.samples = 0
        self.values = 0
        self.histogram = StreamingHistogram(bins) if bins else None
        self.channel_axis = channel_axis
        self._keep_channels = channel_stats
        self._keep_mean = mean_sample
        self._channel_sum: np.ndarray | None = None
        self._channel_zeros: np.ndarray | None = None
        self._channel_count = 0
        self._sample_sum: np.ndarray | None = None
        self._keep_abs_max = channel_abs_max
        self._channel_abs_max: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        """Fold one batch (first axis = samples) into the statistics."""
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating):
            return
        flat = array.reshape(-1)
        vmin, vmax = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            flat = flat[np.isfinite(flat)]
            vmin, vmax = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
        if flat.size:
            self.min = min(self.min, vmin)
            self.max = max(self.max, vmax)
            if self.histogram is not None:
                self.histogram.update(flat, vmin, vmax)
        self.values += flat.size
        self.samples += array.shape[0] if array.ndim else 1
        if self._keep_channels and array.ndim > self.channel_axis:
            axes = tuple(i for i in range(array.ndim) if i != self.channel_axis)
            sums = array.sum(axis=axes, dtype=np.float64)
            zeros = (array == 0).sum(axis=axes)
            if self._channel_sum is None or self._channel_zeros is None:
                self._channel_sum = np.zeros_like(sums)
                self._channel_zeros = np.zeros(sums.shape, np.int64)
            self._channel_sum += sums
            self._channel_zeros += zeros
            self._channel_count += array.size // max(array.shape[self.channel_axis], 1)
        if self._keep_abs_max and array.ndim > self.channel_axis:
            axes = tuple(i for i in range(array.ndim) if i != self.channel_axis)
            top = np.abs(array).max(axis=axes).astype(np.float64)
            self._channel_abs_max = top if self._channel_abs_max is None else np.maximum(
                self._channel_abs_max, top)
        if self._keep_mean and array.ndim:
            total = array.sum(axis=0, dtype=np.float64)
            if self._sample_sum is None:
                self._sample_sum = np.zeros_like(total)
            self._sample_sum += total

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Mean per channel, or None if not kept."""
        if self._channel_sum is None or not self._channel_count:
            return None
        return self._channel_sum / self._channel_count

    @property
    def channel_abs_max(self) -> np.ndarray | None:
        """Largest ``|x|`` per channel, or None if not kept."""
        return self._channel_abs_max

    @property
    def zero_fraction(self) -> np.ndarray | None:
        """Fraction of exact zeros per channel (APoZ), or None if not kept."""
        if self._channel_zeros is None or not self._channel_count:
            return None
        return self._channel_zeros / self._channel_count

    @property
    def mean_sample(self) -> np.ndarray | None:
        """Mean over the batch axis (one sample's shape), or None if not kept."""
        if self._sample_sum is None or not self.samples:
            return None
        return self._sample_sum / self.samples


def collect_activation_stats(
    model: ir.Model,
    source: FeedSource,
    names: Sequence[str],
    *,
    bins: int = DEFAULT_BINS,
    channel_stats: bool = False,
    mean_sample: bool = False,
    channel_abs_max: bool = False,
    batch_size: int = 32,
    limit: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    show_progress: bool = False,
    threads: int = 0,
) -> dict[str, TensorStats]:
    """Statistics of the tensors ``names`` of ``model`` over the calibration feeds.

    Returns:
        Tensor name -> :class:`TensorStats`.
    """
    stats = {n: TensorStats(n, bins, channel_stats, mean_sample,
                            channel_abs_max=channel_abs_max) for n in names}
    batch_size = batch_within(model, list(stats), source, batch_size, input_shapes=input_shapes)
    for (tensors,), _ in stream_tensors([model], [list(stats)], source, batch_size=batch_size,
                                        limit=limit, input_shapes=input_shapes,
                                        show_progress=show_progress, threads=threads):
        for name, array in tensors.items():
            stats[name].update(array)
    logger.debug("collected statistics of %d tensors", len(stats))
    return stats
