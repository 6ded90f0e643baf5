"""Side-by-side latency: warmed-up, interleaved A/B pairs against a baseline; paired ratios."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxopt.session import make_session
from onnxopt.timing import paired_samples, quartiles

#: Intra-op threads of every measured session (the issue fixes 2).
THREADS = 2


def bench_session(path: str, threads: int = THREADS) -> ort.InferenceSession:
    """A CPU session for latency measurement (its thread pool does not spin: a pool still
    spinning after its own run would steal a core from the next session timed)."""
    return make_session(path, threads=threads)


@dataclass
class LatencyStats:
    """Latency of one session, and its ratio to the baseline measured in the same rounds.

    Attributes:
        median_ms: Median time of one run, in milliseconds (information, not a bar).
        q1_ms: First quartile of the per-round times.
        q3_ms: Third quartile of the per-round times.
        ratio: Median over rounds of (this session's sample / the baseline sample taken
            right next to it).
        ratio_q1: First quartile of those paired ratios.
        ratio_q3: Third quartile of those paired ratios.
        rounds: Number of interleaved rounds (paired samples).
        inner: Runs per round (their mean is one sample), chosen so a sample takes a few ms.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    rounds: int
    inner: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    baseline: str,
    *,
    rounds: int = 30,
    warmup_seconds: float = 0.3,
    sample_seconds: float = 0.004,
    seed: int = 0,
) -> dict[str, LatencyStats]:
    """Time every session against ``baseline`` in interleaved, adjacent A/B pairs.

    The pairs are :func:`onnxopt.timing.paired_samples`'s (a sample is the mean of its
    runs); the reported ratio is the median of the paired ratios.

    Args:
        sessions: Label -> session; all take ``feed``.
        feed: Input name -> array.
        baseline: Label of the reference session.
        rounds: Interleaved rounds (paired samples per session).
        warmup_seconds: Minimum warm-up time per session.
        sample_seconds: Minimum duration of one sample.
        seed: Seed of the per-round order.

    Returns:
        Label -> statistics (the baseline's ratio is 1 by definition; its times are
        pooled over all its pairs).
    """
    feeds = {label: {i.name: feed[i.name] for i in s.get_inputs()} for label, s in sessions.items()}
    found = paired_samples(sessions, feeds, baseline, rounds=rounds,
                           warmup_seconds=warmup_seconds, sample_seconds=sample_seconds,
                           seed=seed)
    times, ratios, inner = found.times, found.ratios, found.inner
    stats: dict[str, LatencyStats] = {}
    for label in sessions:
        q1, med, q3 = quartiles(np.asarray(times[label]) * 1e3)
        r1, rmed, r3 = (1.0, 1.0, 1.0) if label == baseline else quartiles(
            np.asarray(ratios[label]))
        stats[label] = LatencyStats(med, q1, q3, rmed, r1, r3, rounds, inner[label])
    return stats
