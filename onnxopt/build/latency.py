"""A sweep's latency: every variant against the original at each batch size.

The timing is :func:`onnxopt.timing.paired_samples` (interleaved, adjacent pairs); a
variant's ratio is the median of its paired ratios. The original is also paired with a
second session of itself (the A/A row): the spread of that ratio is the noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.timing import paired_samples, quartiles

#: The label of the original's A/A row.
NOISE = "original (A/A)"


@dataclass(frozen=True)
class Latency:
    """One model at one batch size: median paired ratio to the original, quartiles, time."""

    ratio: float
    q1: float
    q3: float
    median_ms: float


def session(path: str, threads: int):
    """A CPU session for timing (no spinning thread pool between the paired runs)."""
    from onnxopt.session import make_session

    return make_session(path, threads=threads)


def random_feed(specs: list, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of ``batch`` samples for timing: the engine's random data (``random:N``) for
    the model's input specs, each input batched on its own axis.

    Raises:
        DataError: An input has a dynamic dim besides its batch axis that no
            ``--input-shape`` fixes, or is not a plain tensor.
    """
    from onnxopt.data import random_source

    feed, _ = next(random_source(specs, batch, seed).batches(specs, batch_size=batch,
                                                             limit=batch))
    return feed


def measure(models: Mapping[str, str], original: str, batch_sizes: Sequence[int], *,
            rounds: int = 15, threads: int = 0, input_shapes: Mapping | None = None,
            sample_seconds: float = 0.004) -> dict[int, dict[str, Latency]]:
    """Time every model against ``original`` at each batch size.

    Args:
        models: Label -> model path (the original need not be among them).
        original: Path of the original model.
        batch_sizes: Batch sizes to time at.
        rounds: Interleaved rounds (paired samples per model).
        threads: onnxruntime intra-op threads (0 lets it choose).
        input_shapes: ``--input-shape`` values for dims other than the batch.
        sample_seconds: Minimum duration of one sample (runs are repeated to reach it).

    Returns:
        Batch size -> label -> latency; the ``NOISE`` label is the original against itself.
    """
    from onnxopt.inputs import input_specs
    from onnxopt.model_io import load

    specs = input_specs(load(original), dict(input_shapes or {}))
    sessions = {label: session(path, threads) for label, path in models.items()}
    sessions[NOISE] = session(original, threads)
    base = session(original, threads)
    results: dict[int, dict[str, Latency]] = {}
    for batch in batch_sizes:
        feed = random_feed(specs, batch)
        results[batch] = _measure_batch(sessions, base, feed, rounds, sample_seconds)
    return results


def _measure_batch(sessions: Mapping, base, feed: dict[str, np.ndarray], rounds: int,
                   sample_seconds: float) -> dict[str, Latency]:
    everyone = {**sessions, "": base}
    found = paired_samples(everyone, dict.fromkeys(everyone, feed), "", rounds=rounds,
                           sample_seconds=sample_seconds, warmup_seconds=0.2)
    result = {}
    for label in sessions:
        q1, q2, q3 = quartiles(found.ratios[label])
        result[label] = Latency(q2, q1, q3, 1e3 * float(np.median(found.times[label])))
    return result
