"""The stream of input feeds: model input specs, per-chunk checks and re-batching.

A feed source yields *chunks*: dicts of arrays whose first axis is the sample axis,
plus optional labels. :meth:`FeedSource.batches` re-chunks them to the batch size the
model accepts, so memory is bounded by a batch. The sources themselves (files, random
data, readers, iterables) are built by :mod:`onnxopt.data`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError

logger = logging.getLogger(__name__)

Chunk = tuple[dict[str, np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input: name, numpy dtype and dims (None = dynamic)."""

    name: str
    dtype: Any
    dims: tuple[int | None, ...] | None
    is_tensor: bool = True

    def shape_text(self) -> str:
        if self.dims is None:
            return "[?]"
        return "[" + ", ".join("N" if d is None else str(d) for d in self.dims) + "]"


def _numpy_dtype(dtype: ir.DataType | None) -> Any:
    """The numpy dtype of an ONNX element type, or None if numpy has no plain equivalent."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype.numpy())
    except Exception:  # string and exotic types: no dtype check
        return None


def input_specs(model: ir.Model, overrides: Mapping[str, tuple[int, ...]] | None = None,
                ) -> list[InputSpec]:
    """The feedable inputs of ``model`` with dims from the model or ``--input-shape``."""
    overrides = overrides or {}
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = _numpy_dtype(value.dtype)
        if value.name in overrides:
            dims: tuple[int | None, ...] | None = tuple(overrides[value.name])
        elif value.shape is None:
            dims = None
        else:
            dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        is_tensor = value.type is None or isinstance(value.type, ir.TensorType)
        specs.append(InputSpec(value.name or "", dtype, dims, is_tensor))
    return specs


class FeedSource:
    """A re-iterable source of sample chunks.

    Args:
        chunks: A callable returning a fresh iterator of ``(feeds, labels)`` chunks.
        description: Where the data comes from, for messages.
        num_samples: Total samples if known up front.
    """

    def __init__(self, chunks: Callable[[], Iterator[Chunk]], description: str,
                 num_samples: int | None = None, representative: bool = True,
                 rebatch: bool = True) -> None:
        self._chunks = chunks
        self.description = description
        self.num_samples = num_samples
        self.representative = representative
        self.rebatch = rebatch

    def chunks(self) -> Iterator[Chunk]:
        """A fresh pass over the raw chunks."""
        return self._chunks()

    def batches(self, specs: list[InputSpec], batch_size: int = 32,
                limit: int | None = None) -> Iterator[Chunk]:
        """Chunks re-cut to what the model accepts, checked against ``specs``.

        The batch is ``batch_size`` when the model's batch axis is dynamic, else the
        model's static batch. ``limit`` stops after that many samples.

        Raises:
            DataError: A missing input, wrong rank/shape/dtype, NaN/Inf, or no samples.
        """
        if not self.rebatch:
            yield from self._verbatim(specs, limit)
            return
        static = {s.dims[0] for s in specs if s.dims and s.dims[0] is not None}
        size = static.pop() if len(static) == 1 else batch_size
        buffer: list[Chunk] = []
        buffered = 0
        produced = 0
        for feeds, labels in self.chunks():
            feeds = check_chunk(feeds, specs, self.description)
            buffer.append((feeds, labels))
            buffered += sample_count(feeds)
            while buffered >= size:
                batch, buffer, buffered = _take(buffer, size)
                if limit is not None and produced + size > limit:
                    batch = _head(batch, limit - produced)
                yield batch
                produced += sample_count(batch[0])
                if limit is not None and produced >= limit:
                    return
        if buffered and (limit is None or produced < limit):
            if static and buffered % size:
                logger.warning("dropping the last %d sample%s: too few to fill the model's "
                               "fixed batch", buffered, "" if buffered == 1 else "s")
                return
            batch, _, _ = _take(buffer, buffered)
            if limit is not None:
                batch = _head(batch, limit - produced)
            produced += sample_count(batch[0])
            yield batch
        if produced == 0:
            raise DataError(f"{self.description}: no samples")

    def _verbatim(self, specs: list[InputSpec], limit: int | None) -> Iterator[Chunk]:
        """Each chunk is one run, as a CalibrationDataReader means it: no re-batching."""
        produced = 0
        for feeds, labels in self.chunks():
            feeds = check_chunk(feeds, specs, self.description)
            yield feeds, labels
            produced += max(sample_count(feeds), 1)
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

        def part(held: bool) -> Callable[[], Iterator[Chunk]]:
            def chunks() -> Iterator[Chunk]:
                start = 0
                for feeds, labels in self.chunks():
                    n = sample_count(feeds)
                    mask = (np.arange(start, start + n) % every == 0) == held
                    start += n
                    if mask.any():
                        yield ({k: v[mask] if isinstance(v, np.ndarray) and v.ndim else v
                                for k, v in feeds.items()},
                               None if labels is None else labels[mask])
            return chunks

        n = self.num_samples
        held = None if n is None else (n + every - 1) // every
        return (FeedSource(part(False), f"{self.description} (fit part)",
                           None if n is None else n - held, self.representative),
                FeedSource(part(True), f"{self.description} (held-out part)", held,
                           self.representative))

    def count(self, specs: list[InputSpec]) -> int:
        """Number of samples (iterates the data once if not known)."""
        if self.num_samples is None:
            self.num_samples = sum(sample_count(f) for f, _ in self.batches(specs))
        return self.num_samples


def sample_count(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in a chunk: the first axis of its first non-scalar array (1 for scalars)."""
    for array in feeds.values():
        if isinstance(array, np.ndarray):
            return array.shape[0] if array.ndim else 1
    return 1 if feeds else 0


def _head(batch: Chunk, n: int) -> Chunk:
    feeds, labels = batch
    return {k: v[:n] for k, v in feeds.items()}, None if labels is None else labels[:n]


def _take(buffer: list[Chunk], size: int) -> tuple[Chunk, list[Chunk], int]:
    """Split the first ``size`` samples off ``buffer``."""
    names = list(buffer[0][0])
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    label_parts: list[np.ndarray] = []
    has_labels = all(lab is not None for _, lab in buffer)
    need = size
    rest: list[Chunk] = []
    for feeds, labels in buffer:
        n = sample_count(feeds)
        if need <= 0:
            rest.append((feeds, labels))
            continue
        k = min(n, need)
        for name in names:
            parts[name].append(feeds[name][:k])
        if has_labels:
            label_parts.append(labels[:k])  # type: ignore[index]
        if k < n:
            rest.append(({m: a[k:] for m, a in feeds.items()},
                         None if labels is None else labels[k:]))
        need -= k
    batch = {n: np.ascontiguousarray(np.concatenate(p)) if len(p) > 1 else
             np.ascontiguousarray(p[0]) for n, p in parts.items()}
    labels_out = np.concatenate(label_parts) if has_labels and label_parts else None
    return (batch, labels_out), rest, sum(sample_count(f) for f, _ in rest)


def check_chunk(feeds: Mapping[str, Any], specs: list[InputSpec], where: str,
                ) -> dict[str, np.ndarray]:
    """Validate one chunk against the model's inputs; returns arrays in the model's dtypes."""
    out: dict[str, np.ndarray] = {}
    expected = {s.name for s in specs}
    unknown = sorted(set(feeds) - expected - {"labels"})
    for spec in specs:
        if spec.name not in feeds:
            hint = f" (it has {', '.join(unknown)})" if unknown else ""
            raise DataError(f"{where}: no data for model input '{spec.name}' "
                            f"(expected shape {spec.shape_text()}){hint}")
        if not spec.is_tensor:  # sequences, maps, optionals: onnxruntime checks them
            out[spec.name] = feeds[spec.name]
            continue
        array = np.asarray(feeds[spec.name])
        if spec.dims is not None and (array.ndim != len(spec.dims) or any(
                d is not None and i > 0 and array.shape[i] != d
                for i, d in enumerate(spec.dims))):
            raise DataError(f"{where}: input '{spec.name}' has shape {list(array.shape)}; "
                            f"model expects {spec.shape_text()}")
        if spec.dtype is not None and array.dtype != spec.dtype:
            if np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                array = array.astype(spec.dtype)
            else:
                raise DataError(f"{where}: input '{spec.name}' has dtype {array.dtype}; "
                                f"model expects {np.dtype(spec.dtype).name}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise DataError(f"{where}: input '{spec.name}' contains NaN or Inf")
        out[spec.name] = array
    return out


def num_batches(n: int | None, batch: int) -> int | None:
    """Number of batches for ``n`` samples (None if unknown)."""
    return None if n is None else math.ceil(n / batch)
