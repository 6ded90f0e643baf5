"""A sweep's latency: every variant against the original at each batch size.

The timing is :func:`onnxopt.timing.paired_samples` (interleaved, adjacent pairs); a
variant's ratio is the median of its paired ratios. The original is also paired with a
second session of itself (the A/A row): the spread of that ratio is the noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import UserError
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


def random_feed(sess, batch: int, shapes: Mapping[str, tuple[int, ...]],
                seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of ``batch`` samples for timing: the first dynamic dim is the batch.

    Raises:
        UserError: An input has another dynamic dim that ``shapes`` does not fix.
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in sess.get_inputs():
        if spec.name in shapes:
            dims = [batch, *shapes[spec.name][1:]]
        else:
            dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
            if dims and dims[0] is None:
                dims[0] = batch
            if any(d is None for d in dims):
                raise UserError(f"input {spec.name!r} has a dynamic dim besides the batch; "
                                f"give --input-shape {spec.name}:1x...")
        kind = spec.type[len("tensor("):-1]
        if kind.startswith("float") or kind == "double":
            dtype = {"float": np.float32, "float16": np.float16, "double": np.float64}[kind]
            feed[spec.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feed[spec.name] = np.zeros(dims, dtype=np.int64 if "64" in kind else np.int32)
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
    sessions = {label: session(path, threads) for label, path in models.items()}
    sessions[NOISE] = session(original, threads)
    base = session(original, threads)
    results: dict[int, dict[str, Latency]] = {}
    for batch in batch_sizes:
        feed = random_feed(base, batch, dict(input_shapes or {}))
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
