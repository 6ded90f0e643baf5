"""Side-by-side latency: warmed-up, interleaved A/B pairs against a baseline; paired ratios."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

#: Intra-op threads of every measured session (the issue fixes 2).
THREADS = 2


def bench_session(path: str, threads: int = THREADS) -> ort.InferenceSession:
    """A CPU session for latency measurement.

    Spinning of the intra-op pool is switched off: sessions are run one after another
    in the same process, and a pool still spinning after its own run would steal a core
    from the next session and bias the comparison.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


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


def _quartiles(values: np.ndarray) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


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

    Each session is first warmed up (at least 3 runs and ``warmup_seconds``), which also
    estimates its run time; from that, ``inner`` runs per sample are chosen so one sample
    takes at least ``sample_seconds`` (a sample is the mean over its runs). Then each
    round visits every other session once, in a fresh random order, and takes a sample of
    it right next to a sample of the baseline (which one goes first is random). The ratio
    of the two samples of a pair is one paired ratio: the two were taken a few
    milliseconds apart, so load from other processes and frequency changes hit both
    alike. The reported ratio is the median of the paired ratios.

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
    if baseline not in sessions:
        raise KeyError(f"baseline {baseline!r} is not among the sessions")
    feeds = {label: {i.name: feed[i.name] for i in s.get_inputs()} for label, s in sessions.items()}
    inner: dict[str, int] = {}
    for label, session in sessions.items():
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < warmup_seconds:
            session.run(None, feeds[label])
            runs += 1
        per_run = (time.perf_counter() - start) / runs
        inner[label] = max(1, math.ceil(sample_seconds / max(per_run, 1e-9)))

    def sample(label: str) -> float:
        session, f, n = sessions[label], feeds[label], inner[label]
        start = time.perf_counter()
        for _ in range(n):
            session.run(None, f)
        return (time.perf_counter() - start) / n

    others = [label for label in sessions if label != baseline]
    times: dict[str, list[float]] = {label: [] for label in sessions}
    ratios: dict[str, list[float]] = {label: [] for label in others}
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for idx in rng.permutation(len(others)):
            label = others[idx]
            if rng.random() < 0.5:
                base, other = sample(baseline), sample(label)
            else:
                other, base = sample(label), sample(baseline)
            times[baseline].append(base)
            times[label].append(other)
            ratios[label].append(other / base)
    if not others:  # only the baseline: still report its time
        times[baseline] = [sample(baseline) for _ in range(rounds)]

    stats: dict[str, LatencyStats] = {}
    for label in sessions:
        q1, med, q3 = _quartiles(np.asarray(times[label]) * 1e3)
        r1, rmed, r3 = (1.0, 1.0, 1.0) if label == baseline else _quartiles(
            np.asarray(ratios[label]))
        stats[label] = LatencyStats(med, q1, q3, rmed, r1, r3, rounds, inner[label])
    return stats
