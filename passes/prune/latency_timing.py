"""Timing with onnxruntime for latency budgets: one-node tables and whole models side by side.

The machine is shared and its load changes from second to second, so nothing is timed
alone: models measured together are visited in a fresh random order every round, each
sample is the minimum of a few runs (an interrupted run is slower, never faster), and the
result is the median over rounds. One-node times have the run time of a trivial model,
timed in the same rounds, subtracted (the per-call cost of onnxruntime's Python binding).
Whole models are compared in adjacent pairs against the original, as paired ratios, with an
A/A pair (the original against a second session of itself) as the noise row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.session import make_session
from onnxopt.timing import paired_samples

__all__ = ["SideBySide", "latency_session", "ort_timer", "side_by_side"]


def latency_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A CPU session as a deployment would build it (its threads do not spin)."""
    return make_session(model, threads=threads)


def _trivial() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "t", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, {"x": np.ones(1, np.float32)}


def ort_timer(threads: int, rounds: int = 7, repeat: int = 5, seed: int = 0):
    """A timer for :class:`~onnxopt.passes.prune.latency.LatencyMeter`.

    Args:
        threads: Intra-op threads of every session.
        rounds: Interleaved rounds (the median is taken over them).
        repeat: Runs per sample (the minimum is taken over them).
        seed: Seed of the per-round order.
    """
    def timer(items: Sequence[tuple[onnx.ModelProto, dict[str, np.ndarray]]]) -> list[float]:
        items = [*items, _trivial()]
        sessions = [latency_session(m, threads) for m, _ in items]
        feeds = [f for _, f in items]
        for s, f in zip(sessions, feeds, strict=True):
            for _ in range(2):
                s.run(None, f)
        samples: list[list[float]] = [[] for _ in sessions]
        rng = np.random.default_rng(seed)
        for _ in range(rounds):
            for i in rng.permutation(len(sessions)):
                best = math.inf
                for _ in range(repeat):
                    start = time.perf_counter()
                    sessions[i].run(None, feeds[i])
                    best = min(best, time.perf_counter() - start)
                samples[i].append(best)
        medians = [float(np.median(s)) for s in samples]
        return [max(m - medians[-1], 1e-7) for m in medians[:-1]]

    return timer


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


def side_by_side(original: onnx.ModelProto, models: Sequence[onnx.ModelProto],
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
