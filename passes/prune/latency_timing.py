"""Timing with onnxruntime for latency budgets: one-node tables (whole models side by side are
:func:`onnxopt.timing.side_by_side`).

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

import numpy as np
import onnx

from onnxopt.timing import latency_session

__all__ = ["ort_timer"]


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
