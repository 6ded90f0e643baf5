"""Latency side by side: sessions timed against a baseline in interleaved, adjacent pairs.

One algorithm serves the latency budget of ``prune``, the speed check of ``quantize``,
``onnxopt sweep`` and the benchmarks (:func:`side_by_side` for whole models):
every session is warmed up, which also estimates its run time; from that, the runs per
sample are chosen so a sample takes at least ``sample_seconds``. Each round then visits the
other sessions in a fresh random order and samples each right next to a sample of the
baseline (which goes first is random). The two samples of a pair were taken milliseconds
apart, so load from other processes and frequency changes hit both alike; their ratio is
one paired ratio, and callers report medians and quartiles of those. A second session of
the baseline among the others gives the A/A row: the spread of its ratios is the noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.session import make_session

__all__ = ["Paired", "SideBySide", "latency_session", "paired_samples", "quartiles",
           "side_by_side"]


@dataclass
class Paired:
    """What :func:`paired_samples` measured.

    Attributes:
        ratios: Label (every session but the baseline) -> paired ratios, one per round.
        times: Label -> samples in seconds (the baseline's pooled over all its pairs).
        inner: Label -> runs per sample.
    """

    ratios: dict[str, list[float]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    inner: dict[str, int] = field(default_factory=dict)


def quartiles(values: Any) -> tuple[float, float, float]:
    """First quartile, median and third quartile."""
    q1, q2, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def paired_samples(
    sessions: Mapping[str, Any],
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    baseline: str,
    *,
    rounds: int,
    sample_seconds: float = 0.004,
    warmup_seconds: float = 0.2,
    min_runs: int = 1,
    statistic: Literal["mean", "min"] = "mean",
    seed: int = 0,
) -> Paired:
    """Time every session against ``baseline`` in interleaved, adjacent pairs.

    Args:
        sessions: Label -> onnxruntime session (anything with ``run(None, feed)``).
        feeds: Label -> the feed of that session.
        baseline: Label of the reference session.
        rounds: Interleaved rounds (paired samples per session).
        sample_seconds: Minimum duration of one sample.
        warmup_seconds: Minimum warm-up time per session (at least 3 runs).
        min_runs: Minimum runs per sample.
        statistic: A sample is the ``mean`` of its runs, or the ``min`` (a run another
            process interrupted is slower, never faster).
        seed: Seed of the per-round order.

    Raises:
        KeyError: ``baseline`` is not among the sessions.
    """
    if baseline not in sessions:
        raise KeyError(f"baseline {baseline!r} is not among the sessions")
    found = Paired()
    for label, session in sessions.items():
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < warmup_seconds:
            session.run(None, feeds[label])
            runs += 1
        per_run = (time.perf_counter() - start) / runs
        found.inner[label] = max(min_runs, math.ceil(sample_seconds / max(per_run, 1e-9)))

    def sample(label: str) -> float:
        session, feed = sessions[label], feeds[label]
        if statistic == "min":
            best = math.inf
            for _ in range(found.inner[label]):
                start = time.perf_counter()
                session.run(None, feed)
                best = min(best, time.perf_counter() - start)
            return best
        start = time.perf_counter()
        for _ in range(found.inner[label]):
            session.run(None, feed)
        return (time.perf_counter() - start) / found.inner[label]

    others = [label for label in sessions if label != baseline]
    found.times = {label: [] for label in sessions}
    found.ratios = {label: [] for label in others}
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for index in rng.permutation(len(others)):
            label = others[index]
            if rng.random() < 0.5:
                base, mine = sample(baseline), sample(label)
            else:
                mine, base = sample(label), sample(baseline)
            found.times[baseline].append(base)
            found.times[label].append(mine)
            found.ratios[label].append(mine / base)
    if not others:  # only the baseline: still give its time
        found.times[baseline] = [sample(baseline) for _ in range(rounds)]
    return found


def latency_session(model: onnx.ModelProto | bytes, threads: int) -> ort.InferenceSession:
    """A CPU session as a deployment would build it (its threads do not spin)."""
    return make_session(model, threads=threads)


@dataclass
class SideBySide:
    """Whole models timed against the original in adjacent pairs.

    Attributes:
        baseline_ms: Median time of one run of the original, in milliseconds.
        ratios: Median paired ratio (model / original) of each model, in order.
        spreads: Half the interquartile range of each model's paired ratios.
        aa: Median ratio of the original against itself (the noise row).
        aa_spread: Half the interquartile range of the A/A ratios.
    """

    baseline_ms: float
    ratios: list[float]
    spreads: list[float]
    aa: float
    aa_spread: float

    @property
    def noise(self) -> float:
        """How far a ratio may move by noise alone: the A/A offset plus its spread."""
        return abs(self.aa - 1.0) + self.aa_spread


def side_by_side(original: onnx.ModelProto | bytes, models: Sequence[onnx.ModelProto | bytes],
                 feed: dict[str, np.ndarray], threads: int, rounds: int = 21,
                 sample_seconds: float = 0.003, min_runs: int = 5,
                 seed: int = 0) -> SideBySide:
    """Time ``models`` and a second session of ``original`` against ``original``.

    Every session is warmed up; a sample is the fastest of enough runs to take
    ``sample_seconds``, at least ``min_runs`` (a run another process interrupted is slower,
    never faster); each
    round visits the models in a fresh random order and samples each right next to the
    original (which goes first is random); a pair gives one ratio.
    """
    labels = ["original", "A/A", *(f"model {i}" for i in range(len(models)))]
    if not isinstance(original, bytes):  # serialized once for its two sessions
        original = original.SerializeToString()
    sessions = {label: latency_session(m, threads)
                for label, m in zip(labels, (original, original, *models), strict=True)}
    found = paired_samples(sessions, dict.fromkeys(labels, feed), "original", rounds=rounds,
                           sample_seconds=sample_seconds, warmup_seconds=0.05,
                           min_runs=min_runs, statistic="min", seed=seed)
    ratios = [found.ratios[label] for label in labels[1:]]
    med = [float(np.median(r)) for r in ratios]
    half = [float(np.subtract(*np.percentile(r, [75, 25]))) / 2 for r in ratios]
    base = found.times["original"]
    return SideBySide(float(np.median(base)) * 1e3, med[1:], half[1:], med[0], half[0])
