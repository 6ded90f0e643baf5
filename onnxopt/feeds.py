"""The stream of input feeds: where each input keeps its samples, checks, and re-batching.

A feed source yields *chunks*: dicts of arrays in the model's layout, plus optional labels.
Its :class:`Layout` says where each input keeps its samples: on the input's batch axis
(axis 1 of a recurrent state ``[2, N, 128]``), nowhere (the array is fed as given with
every batch: a fixed state, a 0-d sample rate, a sequence), or one array per sample
stacked on a new leading axis (an input the model cannot batch, given per sample; the
samples then run one at a time). :meth:`FeedSource.batches` re-cuts the chunks to the batch
the model accepts, so memory is bounded by a batch. The sources themselves (files, random
data, readers, iterables) are built by :mod:`onnxopt.data`; what the model expects of its
inputs is :mod:`onnxopt.inputs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxopt.errors import DataError
from onnxopt.inputs import (
    InputSpec,
    check_names,
    conform_dtype,
    fits,
    input_specs,
    shape_error,
)

__all__ = ["Chunk", "FeedSource", "InputSpec", "Layout", "check_chunk", "input_specs",
           "num_batches", "resolve_layout", "sample_count"]

logger = logging.getLogger(__name__)

Chunk = tuple[dict[str, Any], "np.ndarray | None"]


@dataclass(frozen=True)
class Layout:
    """Where the arrays of a source keep their samples, per input.

    Attributes:
        axes: Per input, the axis that holds the samples, or None for an array fed as
            given with every batch. Inputs not listed keep their samples on axis 0.
        each: Inputs stacked one array per sample on a new axis 0 (the model cannot
            batch them): batches are then of one sample, fed without that axis.
    """

    axes: Mapping[str, int | None] = field(default_factory=dict)
    each: frozenset[str] = frozenset()

    def axis(self, name: str) -> int | None:
        """The sample axis of ``name``'s arrays (None: fed as given)."""
        return self.axes.get(name, 0)

    def count(self, feeds: Mapping[str, Any]) -> int:
        """Samples in a chunk: the size of the first array along its sample axis."""
        for name, array in feeds.items():
            axis = self.axis(name)
            if axis is not None and isinstance(array, np.ndarray) and array.ndim > axis:
                return array.shape[axis]
        return 1 if feeds else 0


def resolve_layout(arrays: Mapping[str, Any], specs: list[InputSpec], where: str,
                   ) -> tuple[Layout, int]:
    """Where each input of ``arrays`` keeps its samples, and how many samples there are.

    The count comes from the first input with a batch axis whose array has the model's
    rank. Every other array either has as many samples on its own batch axis, fits the
    model's shape as it is (fed as given: needs no batch axis or a fixed one), or stacks
    one model-shaped array per sample on a new axis 0.

    Raises:
        DataError: A missing input, or an array that fits none of these (the message
            quotes its shape, its sample count and the shape the model expects).
    """
    check_names(arrays, specs, where)
    tensors = [s for s in specs if s.is_tensor and s.dims is not None]
    shapes = {s.name: np.shape(arrays[s.name]) for s in tensors}
    primary = next((s for s in tensors if s.batch_axis is not None
                    and len(shapes[s.name]) == len(s.dims)), None)
    if primary is not None:
        n = shapes[primary.name][primary.batch_axis]
    else:
        stacked = next((s for s in tensors if len(shapes[s.name]) == len(s.dims) + 1), None)
        n = shapes[stacked.name][0] if stacked is not None else 1
    axes: dict[str, int | None] = {}
    each = set()
    for spec in specs:
        if not spec.is_tensor:
            axes[spec.name] = None
            continue
        if spec.dims is None:  # unknown rank: samples on axis 0 if it has them
            shape = np.shape(arrays[spec.name])
            axes[spec.name] = 0 if shape and shape[0] == n else None
            continue
        shape, dims, axis = shapes[spec.name], spec.dims, spec.batch_axis
        if len(shape) == len(dims):
            if axis is not None and shape[axis] == n and fits(shape, dims, axis):
                axes[spec.name] = axis
                continue
            if fits(shape, dims) and (axis is None or dims[axis] is not None):
                axes[spec.name] = None
                continue
            if axis is not None and fits(shape, dims, axis) and primary is not None:
                raise DataError(
                    f"{where}: input '{spec.name}' has shape {list(shape)} ({shape[axis]} "
                    f"samples on axis {axis}) but input '{primary.name}' has {n} samples "
                    f"({list(shapes[primary.name])}); the model expects {spec.shape_text()}")
        elif len(shape) == len(dims) + 1 and shape[0] == n and fits(shape[1:], dims, axis):
            axes[spec.name] = 0
            each.add(spec.name)
            continue
        raise shape_error(where, spec, shape)
    return Layout(axes, frozenset(each)), n


class FeedSource:
    """A re-iterable source of sample chunks.

    Args:
        chunks: A callable returning a fresh iterator of ``(feeds, labels)`` chunks.
        description: Where the data comes from, for messages.
        num_samples: Total samples if known up front.
        representative: False for random data (messages then ask for real data).
        rebatch: False: each chunk is one run, fed as it is (readers, feed dicts).
        layout: Where the chunks' arrays keep their samples (default: axis 0).
        cast_inputs: Convert numeric data of any type to the model's input types.
    """

    def __init__(self, chunks: Callable[[], Iterator[Chunk]], description: str,
                 num_samples: int | None = None, representative: bool = True,
                 rebatch: bool = True, *, layout: Layout | None = None,
                 cast_inputs: bool = False) -> None:
        self._chunks = chunks
        self.description = description
        self.num_samples = num_samples
        self.representative = representative
        self.rebatch = rebatch
        self.layout = layout or Layout()
        self.cast_inputs = cast_inputs
        self._noted: set[str] = set()  # conversion notes already logged

    def chunks(self) -> Iterator[Chunk]:
        """A fresh pass over the raw chunks."""
        return self._chunks()

    def batches(self, specs: list[InputSpec], batch_size: int = 32,
                limit: int | None = None) -> Iterator[Chunk]:
        """Chunks re-cut to what the model accepts, checked against ``specs``.

        The batch is ``batch_size`` when the model's batch axes are dynamic, else the
        model's fixed batch, and 1 when an input is given per sample but cannot be
        batched. ``limit`` stops after that many samples.

        Raises:
            DataError: A missing input, wrong rank/shape/dtype, NaN/Inf, or no samples.
        """
        if not self.rebatch:
            yield from self._verbatim(specs, limit)
            return
        layout = self.layout
        size, fixed = _batch_size(specs, layout, batch_size)
        buffer: list[Chunk] = []
        buffered = produced = 0
        for feeds, labels in self.chunks():
            buffer.append((self._check(feeds, specs), labels))
            buffered += layout.count(feeds)
            while buffered >= size:
                batch, buffer, buffered = _take(buffer, size, layout)
                if limit is not None and produced + size > limit:
                    batch = _head(batch, limit - produced, layout)
                produced += layout.count(batch[0])
                yield _unstack(batch, layout)
                if limit is not None and produced >= limit:
                    return
        if buffered and (limit is None or produced < limit) and (produced or not fixed):
            if fixed:
                logger.warning("%s: dropping the last %d sample(s) that do not fill the "
                               "model's fixed batch of %d", self.description, buffered, size)
            else:
                batch, _, _ = _take(buffer, buffered, layout)
                if limit is not None:
                    batch = _head(batch, limit - produced, layout)
                produced += layout.count(batch[0])
                yield _unstack(batch, layout)
        if produced == 0:
            raise DataError(f"{self.description}: {buffered} samples do not fill one batch of "
                            f"the model's fixed batch of {size}" if buffered else
                            f"{self.description}: no samples")

    def _check(self, feeds: Mapping[str, Any], specs: list[InputSpec],
               layout: Layout | None = None) -> dict[str, Any]:
        return check_chunk(feeds, specs, self.description, layout=layout or self.layout,
                           cast_inputs=self.cast_inputs, noted=self._noted)

    def _verbatim(self, specs: list[InputSpec], limit: int | None) -> Iterator[Chunk]:
        """Each chunk is one run, as a CalibrationDataReader means it: no re-batching."""
        produced = 0
        as_given = Layout({s.name: s.batch_axis for s in specs})
        for feeds, labels in self.chunks():
            feeds = self._check(feeds, specs, as_given)
            yield feeds, labels
            produced += max(sample_count(feeds, specs), 1)
            if limit is not None and produced >= limit:
                return
        if produced == 0:
            raise DataError(f"{self.description}: no samples")

    def holdout(self, every: int) -> tuple[FeedSource, FeedSource]:
        """``(rest, held)``: every ``every``-th sample (0, every, 2 every, ...) is held out.

        Interleaved, so both parts cover the whole source (no ordering bias). A source of
        verbatim runs (``rebatch=False``) keeps its runs whole: it returns itself twice.
        """
        if not self.rebatch or every < 2:
            return self, self
        layout = self.layout

        def part(held: bool) -> Callable[[], Iterator[Chunk]]:
            def chunks() -> Iterator[Chunk]:
                start = 0
                for feeds, labels in self.chunks():
                    n = layout.count(feeds)
                    mask = (np.arange(start, start + n) % every == 0) == held
                    start += n
                    if mask.any():
                        yield ({k: _select(v, layout.axis(k), mask) for k, v in feeds.items()},
                               None if labels is None else labels[mask])
            return chunks

        n = self.num_samples
        held = None if n is None else (n + every - 1) // every
        parts = []
        for is_held, count, name in ((False, None if n is None else n - held, "fit part"),
                                     (True, held, "held-out part")):
            source = FeedSource(part(is_held), f"{self.description} ({name})", count,
                                self.representative, layout=layout,
                                cast_inputs=self.cast_inputs)
            source._noted = self._noted
            parts.append(source)
        return parts[0], parts[1]

    def count(self, specs: list[InputSpec]) -> int:
        """Number of samples (iterates the data once if not known)."""
        if self.num_samples is None:
            self.num_samples = sum(sample_count(f, specs) for f, _ in self.batches(specs))
        return self.num_samples


def sample_count(feeds: Mapping[str, Any], specs: list[InputSpec] | None = None) -> int:
    """Samples in a batch as fed to the model.

    With ``specs``: the size of the first input with a batch axis along it (1 when no
    input has one). Without: the first axis of the first non-scalar array.
    """
    if specs is not None:
        for spec in specs:
            array = feeds.get(spec.name)
            if (spec.batch_axis is not None and isinstance(array, np.ndarray)
                    and spec.dims is not None and array.ndim == len(spec.dims)):
                return array.shape[spec.batch_axis]
        return 1 if feeds else 0
    for array in feeds.values():
        if isinstance(array, np.ndarray):
            return array.shape[0] if array.ndim else 1
    return 1 if feeds else 0


def _batch_size(specs: list[InputSpec], layout: Layout, batch_size: int) -> tuple[int, bool]:
    """``(size, fixed)``: the batch the model takes, and whether the model fixes it."""
    if layout.each:
        return 1, False
    fixed = {}
    for spec in specs:
        axis = layout.axis(spec.name)
        if (spec.is_tensor and axis is not None and spec.dims is not None
                and axis < len(spec.dims) and spec.dims[axis] is not None):
            fixed[spec.name] = spec.dims[axis]
    sizes = set(fixed.values())
    if len(sizes) > 1:
        text = ", ".join(f"'{name}' {size}" for name, size in fixed.items())
        raise DataError(f"the model's inputs (with --input-shape) disagree on the batch: {text}")
    return (sizes.pop(), True) if sizes else (batch_size, False)


def _cut(array: np.ndarray, axis: int, start: int, stop: int | None) -> np.ndarray:
    return array[(slice(None),) * axis + (slice(start, stop),)]


def _select(array: Any, axis: int | None, mask: np.ndarray) -> Any:
    if axis is None or not isinstance(array, np.ndarray) or array.ndim <= axis:
        return array
    return np.compress(mask, array, axis=axis)


def _head(batch: Chunk, n: int, layout: Layout) -> Chunk:
    feeds, labels = batch
    return ({k: v if (axis := layout.axis(k)) is None else _cut(v, axis, 0, n)
             for k, v in feeds.items()}, None if labels is None else labels[:n])


def _take(buffer: list[Chunk], size: int, layout: Layout) -> tuple[Chunk, list[Chunk], int]:
    """Split the first ``size`` samples off ``buffer`` (arrays fed as given stay whole)."""
    names = list(buffer[0][0])
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    label_parts: list[np.ndarray] = []
    has_labels = all(lab is not None for _, lab in buffer)
    need = size
    rest: list[Chunk] = []
    for feeds, labels in buffer:
        n = layout.count(feeds)
        if need <= 0:
            rest.append((feeds, labels))
            continue
        k = min(n, need)
        for name in names:
            axis = layout.axis(name)
            parts[name].append(feeds[name] if axis is None else _cut(feeds[name], axis, 0, k))
        if has_labels:
            label_parts.append(labels[:k])  # type: ignore[index]
        if k < n:
            rest.append(({m: a if (axis := layout.axis(m)) is None else _cut(a, axis, k, None)
                          for m, a in feeds.items()}, None if labels is None else labels[k:]))
        need -= k
    batch = {}
    for name, p in parts.items():
        axis = layout.axis(name)
        if axis is None:
            batch[name] = p[0]
        else:
            batch[name] = np.ascontiguousarray(np.concatenate(p, axis=axis) if len(p) > 1
                                               else p[0])
    labels_out = np.concatenate(label_parts) if has_labels and label_parts else None
    return (batch, labels_out), rest, sum(layout.count(f) for f, _ in rest)


def _unstack(batch: Chunk, layout: Layout) -> Chunk:
    """A batch as fed: inputs stacked per sample lose their stacking axis (batch of one)."""
    feeds, labels = batch
    if not layout.each:
        return batch
    return {k: v[0, ...] if k in layout.each else v for k, v in feeds.items()}, labels


def check_chunk(feeds: Mapping[str, Any], specs: list[InputSpec], where: str, *,
                layout: Layout | None = None, cast_inputs: bool = False,
                noted: set[str] | None = None) -> dict[str, Any]:
    """Validate one chunk against the model's inputs; returns arrays in the model's dtypes.

    Args:
        feeds: The chunk's arrays (sequences, optionals and maps are passed through).
        specs: The model's inputs.
        where: The data's source, for messages.
        layout: Where the chunk keeps its samples (default: on each input's batch axis).
        cast_inputs: Convert numeric data of any type (see :func:`conform_dtype`).
        noted: Conversion notes already logged; each is logged once and added here.

    Raises:
        DataError: A missing input, a shape or dtype that does not fit, NaN or Inf.
    """
    check_names(feeds, specs, where)
    layout = layout or Layout({s.name: s.batch_axis for s in specs})
    out: dict[str, Any] = {}
    for spec in specs:
        if not spec.is_tensor:  # sequences, maps, optionals: onnxruntime checks them
            out[spec.name] = feeds[spec.name]
            continue
        array = np.asarray(feeds[spec.name])
        shape = array.shape[1:] if spec.name in layout.each else array.shape
        skip = spec.batch_axis if spec.batch_axis is not None else layout.axis(spec.name)
        if spec.dims is not None and not fits(shape, spec.dims, skip):
            raise shape_error(where, spec, array.shape)
        array, note = conform_dtype(array, spec, where, cast_inputs=cast_inputs)
        if note is not None and (noted is None or note[1] not in noted):
            logger.log(*note)
            if noted is not None:
                noted.add(note[1])
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise DataError(f"{where}: input '{spec.name}' contains NaN or Inf")
        out[spec.name] = array
    return out


def num_batches(n: int | None, batch: int) -> int | None:
    """Number of batches for ``n`` samples (None if unknown)."""
    return None if n is None else math.ceil(n / batch)
