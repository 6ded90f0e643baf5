"""The original model's outputs at sampled rows of its linear consumers: the refit targets.

Least-squares compensation (:mod:`.reconstruct`) fits each pruned consumer to these; they are
computed in one pass of the unpruned model and shared by refits on the same data.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.feeds import input_specs
from onnxopt.passes.prune.capture import LinearView
from onnxopt.passes.prune.runner import segment
from onnxopt.progress import progress
from onnxopt.session import make_session

__all__ = ["TargetCache"]


class TargetCache:
    """The original model's outputs at sampled rows of its linear consumers, per batch.

    Computed in one pass of the original model for the consumers asked for, and kept, so
    several refits on the same data (the probes of :mod:`.sensitivity`) share them. The
    rows of a consumer in a batch are drawn from a generator seeded by ``seed``, the batch's
    first sample and the consumer's output name, so they do not depend on which other
    consumers were asked for at the same time.

    Args:
        original: The unpruned model.
        source: Calibration feeds.
        input_shapes: Concrete shapes of dynamic inputs.
        positions: Output locations sampled per sample and Conv.
        seed: Seed of the sampling.
        batch_size: Batch size when the batch axis is dynamic (the refits that use the
            cache must use the same).
        limit: At most this many samples.
        show_progress: Allow a progress bar.
    """

    def __init__(self, original: ir.Model, source: FeedSource,
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None, *,
                 positions: int = 16, seed: int = 0, batch_size: int = 32,
                 limit: int | None = None, show_progress: bool = False) -> None:
        self.original = original
        self.source = source
        self.specs = input_specs(original, input_shapes)
        self.positions = positions
        self.seed = seed
        self.batch_size = batch_size
        self.limit = limit
        self.show_progress = show_progress
        self.rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def ensure(self, views: Mapping[str, LinearView]) -> None:
        """Compute the rows of the consumers ``views`` (output name -> view) not yet known."""
        missing = {name: view for name, view in views.items() if name not in self.rows}
        if not missing:
            return
        proto, _, _ = segment(self.original, list(missing))
        if proto is None:
            raise ValueError("consumer outputs must be computed by nodes")
        session = make_session(proto)
        names = list(missing)
        for name in names:
            self.rows[name] = []
        start = 0
        batches = self.source.batches(self.specs, self.batch_size, self.limit)
        for feeds, _ in progress(batches, enabled=self.show_progress, desc="prune: targets"):
            wanted = {i.name for i in session.get_inputs()}
            arrays = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
            for name, y in zip(names, arrays, strict=True):
                rng = np.random.default_rng([self.seed, start, zlib.crc32(name.encode())])
                coords = missing[name].sample(y.shape, self.positions, rng)
                self.rows[name].append((coords, np.ascontiguousarray(
                    missing[name].outputs(y, coords), dtype=np.float32)))
            start += len(next(iter(feeds.values()))) if feeds else 1

    def drop(self, names: Sequence[str]) -> None:
        """Forget the rows of these consumers."""
        for name in names:
            self.rows.pop(name, None)
