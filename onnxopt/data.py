"""Input feeds for calibration and validation: where the samples come from.

Accepted forms:

- ``path.npz``: arrays keyed by input name, optional ``labels``; each array holds its
  samples on the input's batch axis (axis 0 mostly, axis 1 of a state ``[2, N, 128]``), or
  is fed as given with every batch when it has the model's shape (a 0-d sample rate);
- a folder of ``.npy`` files: either one file per input named ``<input>.npy`` (the same
  layouts, optional ``labels.npy``), or, for a single-input model, one file per sample;
- ``random:N``: N samples of random data from the input shapes (see :func:`random_source`);
- in Python: a dict of arrays (as in a ``.npz``), an onnxruntime ``CalibrationDataReader``
  (anything with ``get_next()``), or any iterable of feed dicts, each fed as one run.

Every form becomes a :class:`~onnxopt.feeds.FeedSource`, which streams the data in batches
(re-exported here with the rest of :mod:`onnxopt.feeds`). Memory is bounded by a batch and
by one source file for ``.npz``; use a folder of ``.npy`` files, which are memory-mapped,
for very large sets.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError
from onnxopt.feeds import (
    Chunk,
    FeedSource,
    InputSpec,
    Layout,
    check_chunk,
    input_specs,
    num_batches,
    resolve_layout,
    sample_count,
)
from onnxopt.inputs import dtype_kind

__all__ = [
    "Chunk",
    "FeedSource",
    "InputSpec",
    "Layout",
    "check_chunk",
    "from_arrays",
    "from_iterable",
    "from_npy_folder",
    "from_npz",
    "from_reader",
    "input_specs",
    "num_batches",
    "open_feeds",
    "parse_input_shapes",
    "random_source",
    "sample_count",
]

logger = logging.getLogger(__name__)


def from_arrays(arrays: Mapping[str, Any], description: str, chunk: int = 256,
                specs: list[InputSpec] | None = None) -> FeedSource:
    """A source over in-memory (or memory-mapped) arrays keyed by input name.

    Args:
        arrays: The arrays, plus optional ``labels`` (one per sample).
        description: Where they come from, for messages.
        chunk: Samples per chunk.
        specs: The model's inputs. With them each array keeps its samples on the input's
            batch axis, fits the model's shape as it is (fed as given with every batch),
            or stacks one array per sample on a new axis 0 (see
            :func:`~onnxopt.feeds.resolve_layout`); arrays that are no model input are
            left out. Without them, every array keeps its samples on axis 0.

    Raises:
        DataError: No arrays, or arrays that do not fit the model or one another.
    """
    arrays = dict(arrays)
    labels = arrays.pop("labels", None)
    if not arrays:
        raise DataError(f"{description}: no input arrays")
    if specs is None:
        counts = {k: np.shape(v)[0] if np.ndim(v) else 0 for k, v in arrays.items()}
        if len(set(counts.values())) != 1:
            raise DataError(f"{description}: arrays differ in sample count: {counts}")
        layout, n = Layout(), next(iter(counts.values()))
    else:
        tensors = {s.name for s in specs if s.is_tensor}
        arrays = {k: np.asanyarray(v) if k in tensors else v for k, v in arrays.items()}
        layout, n = resolve_layout(arrays, specs, description)
        extra = sorted(set(arrays) - {s.name for s in specs})
        if extra:
            logger.warning("%s: ignoring arrays that are no model input: %s", description,
                           ", ".join(extra))
            arrays = {k: v for k, v in arrays.items() if k not in extra}
    if labels is not None and len(labels) != n:
        raise DataError(f"{description}: {len(labels)} labels for {n} "
                        f"sample{'' if n == 1 else 's'}")

    def chunks() -> Iterator[Chunk]:
        for start in range(0, n, chunk):
            yield ({k: v if (axis := layout.axis(k)) is None else
                    np.asarray(v[(slice(None),) * axis + (slice(start, start + chunk),)])
                    for k, v in arrays.items()},
                   None if labels is None else np.asarray(labels[start:start + chunk]))

    return FeedSource(chunks, description, n, layout=layout)


def from_npz(path: str | os.PathLike, specs: list[InputSpec] | None = None) -> FeedSource:
    """A source over an ``.npz`` file (arrays keyed by input name, optional ``labels``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"not a readable .npz file: {p} ({exc})") from None
    return from_arrays(arrays, str(p), specs=specs)


def from_npy_folder(path: str | os.PathLike, specs: list[InputSpec]) -> FeedSource:
    """A source over a folder of ``.npy`` files (see the module docstring for layouts)."""
    p = Path(path)
    files = sorted(p.glob("*.npy"))
    if not files:
        raise DataError(f"no .npy files in {p}")
    by_stem = {f.stem: f for f in files}
    input_names = [s.name for s in specs]
    if all(name in by_stem for name in input_names):
        arrays = {name: np.load(by_stem[name], mmap_mode="r") for name in input_names}
        if "labels" in by_stem:
            arrays["labels"] = np.load(by_stem["labels"])
        return from_arrays(arrays, str(p), specs=specs)
    if len(input_names) != 1:
        missing = [n for n in input_names if n not in by_stem]
        raise DataError(f"{p}: no file for model input '{missing[0]}' "
                        f"(expected {missing[0]}.npy)")
    spec = specs[0]
    samples = [f for f in files if f.stem != "labels"]
    # One file per sample: batched on the input's batch axis, or one run per file.
    layout = Layout({spec.name: spec.batch_axis or 0},
                    frozenset() if spec.batch_axis is not None else {spec.name})

    def chunks() -> Iterator[Chunk]:
        for f in samples:
            array = np.load(f)
            yield {spec.name: array if spec.batch_axis is not None else array[None]}, None

    return FeedSource(chunks, str(p), layout=layout)


def random_source(specs: list[InputSpec], n: int, seed: int = 0) -> FeedSource:
    """``n`` samples of random data from the input specs.

    Floats are standard-normal, booleans 0 or 1, other integers in [0, 10). Inputs with
    a batch axis get one value per sample; the others (states, scalars) one array, fed
    with every batch. A model whose inputs must hold particular values (a sample rate,
    token ids) may reject such data; onnxruntime's refusal is then reported as a data
    error asking for real data.

    Raises:
        DataError: An input is not a plain tensor, or has a dynamic dim other than its
            batch axis and no ``--input-shape`` override.
    """
    for spec in specs:
        if not spec.is_tensor or spec.dtype is None or dtype_kind(spec.dtype) not in "biuf":
            kind = spec.kind if not spec.is_tensor else f"type {spec.dtype}"
            raise DataError(f"cannot make random data for input '{spec.name}' ({kind}); "
                            f"give real data")
        if spec.dims is None or any(d is None for i, d in enumerate(spec.dims)
                                    if i != spec.batch_axis):
            raise DataError(f"input '{spec.name}' has dynamic shape {spec.shape_text()}; "
                            f"give it with --input-shape {spec.name}:{spec.example_shape()}")
    layout = Layout({s.name: s.batch_axis for s in specs})
    fixed = {s.dims[s.batch_axis] for s in specs
             if s.batch_axis is not None and s.dims[s.batch_axis] is not None}

    def chunks() -> Iterator[Chunk]:
        rng = np.random.default_rng(seed)
        given = {s.name: _random(np.random.default_rng([seed, 1]), s, s.dims)
                 for s in specs if s.batch_axis is None}
        left = n
        while left > 0:
            b = min(fixed) if fixed else min(left, 32)
            feeds = {}
            for spec in specs:
                if spec.batch_axis is None:
                    feeds[spec.name] = given[spec.name]
                    continue
                dims = list(spec.dims)
                dims[spec.batch_axis] = b
                feeds[spec.name] = _random(rng, spec, dims)
            left -= b
            yield feeds, None

    return FeedSource(chunks, f"random:{n}", n, representative=False, layout=layout)


def _random(rng: np.random.Generator, spec: InputSpec, shape: Any) -> np.ndarray:
    shape = tuple(shape)
    if dtype_kind(spec.dtype) == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 10, shape).astype(spec.dtype)


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
            yield {k: v if v is None or isinstance(v, (list, tuple, dict)) else np.asarray(v)
                   for k, v in feed.items()}, (
                None if labels is None else np.asarray(labels).reshape(-1))

    return FeedSource(chunks, description, rebatch=False)


_RANDOM = re.compile(r"^random:(\d+)$")


def open_feeds(spec: Any, model: ir.Model, *, seed: int = 0,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None,
               cast_inputs: bool = False) -> FeedSource:
    """Turn whatever the user passed as data into a :class:`FeedSource`.

    Args:
        spec: ``random:N``, a ``.npz`` path, a folder of ``.npy``, a ``FeedSource``,
            a ``CalibrationDataReader``, a dict of arrays, or an iterable of feed dicts.
        model: The model whose inputs the data must fit.
        seed: Seed for ``random:N``.
        input_shapes: Concrete shapes for dynamic inputs.
        cast_inputs: Convert numeric data of any type to the model's input types, values
            as they are (by default integer data for a float input is an error).
    """
    if isinstance(spec, FeedSource):
        return spec
    source = _open(spec, input_specs(model, input_shapes), seed)
    source.cast_inputs = cast_inputs
    return source


def _open(spec: Any, specs: list[InputSpec], seed: int) -> FeedSource:
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
            return from_npy_folder(p, specs)
        if p.suffix == ".npz" or p.is_file():
            return from_npz(p, specs)
        raise DataError(f"data file not found: {p}")
    if isinstance(spec, Mapping):
        return from_arrays(spec, "arrays", specs=specs)
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
