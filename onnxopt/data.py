"""Input feeds for calibration and validation: where the samples come from.

Accepted forms:

- ``path.npz``: arrays keyed by input name, first axis = samples, optional ``labels``;
- a folder of ``.npy`` files: either one file per input named ``<input>.npy`` (first axis
  = samples, optional ``labels.npy``), or, for a single-input model, one file per sample;
- ``random:N``: N samples of standard-normal data from the input shapes;
- in Python: an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``),
  or any iterable of feed dicts.

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
    check_chunk,
    input_specs,
    num_batches,
    sample_count,
)

__all__ = [
    "Chunk",
    "FeedSource",
    "InputSpec",
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
        raise DataError(f"{description}: {len(labels)} labels for {n} "
                        f"sample{'' if n == 1 else 's'}")

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
