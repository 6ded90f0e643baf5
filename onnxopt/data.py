"""Input feeds for calibration and validation, streamed in batches.

A feed source yields *chunks*: dicts of arrays whose first axis is the sample axis,
plus optional labels. :meth:`FeedSource.batches` re-chunks them to the batch size the
model accepts, so memory is bounded by a batch (and by one source file for ``.npz``;
use a folder of ``.npy`` files, which are memory-mapped, for very large sets).

Accepted forms:

- ``path.npz``: arrays keyed by input name, first axis = samples, optional ``labels``;
- a folder of ``.npy`` files: either one file per input named ``<input>.npy`` (first axis
  = samples, optional ``labels.npy``), or, for a single-input model, one file per sample;
- ``random:N``: N samples of standard-normal data from the input shapes;
- in Python: an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``),
  or any iterable of feed dicts.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
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
                logger.warning("dropping %d samples that do not fill the model's fixed batch",
                               buffered)
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


def from_arrays(arrays: Mapping[str, np.ndarray], description: str,
                chunk: int = 256) -> FeedSource:
    """A source over in-memory (or memory-mapped) arrays with a shared sample axis."""
    arrays = dict(arrays)
    labels = arrays.pop("labels", None)
    if not arrays:
        raise DataError(f"{description}: no input arrays")
    counts = {k: np.shape(v)[0] if np.ndim(v) else 0 for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{description}: arrays differ in sample count: {counts}")
    n = next(iter(counts.values()))
    if labels is not None and len(labels) != n:
        raise DataError(f"{description}: {len(labels)} labels for {n} samples")

    def chunks() -> Iterator[Chunk]:
        for start in range(0, n, chunk):
            yield ({k: np.asarray(v[start:start + chunk]) for k, v in arrays.items()},
                   None if labels is None else np.asarray(labels[start:start + chunk]))

    return FeedSource(chunks, description, n)


def from_npz(path: str | os.PathLike) -> FeedSource:
    """A source over an ``.npz`` file (arrays keyed by input name, optional ``labels``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"not a readable .npz file: {p} ({exc})") from None
    return from_arrays(arrays, str(p))


def from_npy_folder(path: str | os.PathLike, input_names: list[str]) -> FeedSource:
    """A source over a folder of ``.npy`` files (see the module docstring for layouts)."""
    p = Path(path)
    files = sorted(p.glob("*.npy"))
    if not files:
        raise DataError(f"no .npy files in {p}")
    by_stem = {f.stem: f for f in files}
    if all(name in by_stem for name in input_names):
        arrays = {name: np.load(by_stem[name], mmap_mode="r") for name in input_names}
        if "labels" in by_stem:
            arrays["labels"] = np.load(by_stem["labels"])
        return from_arrays(arrays, str(p))
    if len(input_names) != 1:
        missing = [n for n in input_names if n not in by_stem]
        raise DataError(f"{p}: no file for model input '{missing[0]}' "
                        f"(expected {missing[0]}.npy)")
    name = input_names[0]
    samples = [f for f in files if f.stem != "labels"]

    def chunks() -> Iterator[Chunk]:
        for f in samples:
            array = np.load(f)
            yield {name: array}, None

    return FeedSource(chunks, str(p))


def random_source(specs: list[InputSpec], n: int, seed: int = 0) -> FeedSource:
    """``n`` samples of standard-normal data (integers in [0, 10)) from the input specs.

    Raises:
        DataError: An input has a dynamic dim other than the batch and no override.
    """
    shapes = {}
    for spec in specs:
        if spec.dims is None or any(d is None for d in spec.dims[1:]):
            raise DataError(f"input '{spec.name}' has dynamic shape {spec.shape_text()}; "
                            f"give it with --input-shape {spec.name}:1x...")
        shapes[spec.name] = spec.dims

    def chunks() -> Iterator[Chunk]:
        rng = np.random.default_rng(seed)
        left = n
        while left > 0:
            feeds = {}
            for spec in specs:
                dims = shapes[spec.name]
                b = dims[0] if dims and dims[0] is not None else min(left, 32)
                shape = (b, *dims[1:]) if dims else ()
                if spec.dtype is None or spec.dtype.kind == "O":
                    raise DataError(f"cannot make random data for input '{spec.name}' of "
                                    f"type {spec.dtype}; give real data")
                if "float" in spec.dtype.name:
                    feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype == np.bool_:
                    feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
                else:
                    feeds[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
            left -= sample_count(feeds) or left
            yield feeds, None

    return FeedSource(chunks, f"random:{n}", n, representative=False)


def from_reader(reader: Any, description: str = "CalibrationDataReader") -> FeedSource:
    """A source over an onnxruntime ``CalibrationDataReader``.

    Readers with ``rewind()`` are rewound for each pass; others are read once and kept.
    """
    if hasattr(reader, "rewind"):
        def chunks() -> Iterator[Chunk]:
            reader.rewind()
            while (feed := reader.get_next()) is not None:
                yield dict(feed), None
        return FeedSource(chunks, description, rebatch=False)
    cached = []
    while (feed := reader.get_next()) is not None:
        cached.append(dict(feed))
    return from_iterable(cached, description)


def from_iterable(items: Iterable[Mapping[str, Any]], description: str = "feeds") -> FeedSource:
    """A source over an iterable of feed dicts (one-shot iterators are read once and kept)."""
    if iter(items) is items:  # a generator or iterator can be consumed only once
        items = list(items)

    def chunks() -> Iterator[Chunk]:
        for feed in items:
            feed = dict(feed)
            labels = feed.pop("labels", None)
            yield {k: v if isinstance(v, (list, dict)) else np.asarray(v)
                   for k, v in feed.items()}, (
                None if labels is None else np.asarray(labels).reshape(-1))

    return FeedSource(chunks, description, rebatch=False)


_RANDOM = re.compile(r"^random:(\d+)$")


def open_feeds(spec: Any, model: ir.Model, *, seed: int = 0,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> FeedSource:
    """Turn whatever the user passed as data into a :class:`FeedSource`.

    Args:
        spec: ``random:N``, a ``.npz`` path, a folder of ``.npy``, a ``FeedSource``,
            a ``CalibrationDataReader``, a dict of arrays, or an iterable of feed dicts.
        model: The model whose inputs the data must fit.
        seed: Seed for ``random:N``.
        input_shapes: Concrete shapes for dynamic inputs.
    """
    if isinstance(spec, FeedSource):
        return spec
    specs = input_specs(model, input_shapes)
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        match = _RANDOM.match(text)
        if match:
            n = int(match.group(1))
            if n <= 0:
                raise DataError("random:N needs N > 0")
            logger.warning("random data is not representative: accuracy, calibration and "
                           "lossy metrics on it say little about real inputs")
            return random_source(specs, n, seed)
        if text.startswith("random"):
            raise DataError(f"bad data spec {text!r}; use random:N, e.g. random:64")
        p = Path(text)
        if p.is_dir():
            return from_npy_folder(p, [s.name for s in specs])
        if p.suffix == ".npz" or p.is_file():
            return from_npz(p)
        raise DataError(f"data file not found: {p}")
    if isinstance(spec, Mapping):
        return from_arrays(spec, "arrays")
    if hasattr(spec, "get_next"):
        return from_reader(spec)
    if isinstance(spec, Iterable):
        return from_iterable(spec)
    raise DataError(f"cannot use {type(spec).__name__} as input data")


def parse_input_shapes(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1x3x224x224`` items from ``--input-shape``."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise DataError(f"bad --input-shape {item!r}; expected name:1x3x224x224")
        shapes[name] = shape
    return shapes


def num_batches(n: int | None, batch: int) -> int | None:
    """Number of batches for ``n`` samples (None if unknown)."""
    return None if n is None else math.ceil(n / batch)
