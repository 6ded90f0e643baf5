"""An independent re-check: the input and the output model in fresh onnxruntime sessions.

This does not use onnxopt's own validation: plain onnxruntime sessions (all graph
optimizations on, as a deployment would run them) are fed the same evaluation data in
batches cut along each input's sample axis, and the outputs are compared with the rule the
README states for exact passes, ``|a - r| <= atol * max|r| + rtol * |r|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.corpus.models import CorpusModel


@dataclass
class Recheck:
    """How far the output model's outputs are from the input model's on the same data."""

    max_abs_error: float
    needed_rtol: float
    sqnr_db: float
    agreement: float | None
    samples: int

    def within(self, rtol: float) -> bool:
        """Whether every element met the tolerance (with the atol it was measured at)."""
        return self.needed_rtol <= rtol


def session(path: Path | str) -> ort.InferenceSession:
    """A fresh CPU session with two intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about unused initializers
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batches(model: CorpusModel, arrays: dict[str, np.ndarray], size: int) -> list[dict]:
    """Feeds of at most ``size`` samples, cut along each input's sample axis."""
    axes = {name: model.batch_axis(name) for name in arrays}
    counts = {arrays[k].shape[a] for k, a in axes.items() if a is not None}
    (n,) = counts
    feeds = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        feeds.append({k: v if axes[k] is None else np.take(v, range(start, stop), axis=axes[k])
                      for k, v in arrays.items()})
    return feeds


def run(sess: ort.InferenceSession, model: CorpusModel, arrays: dict[str, np.ndarray],
        ) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    """Every output over all samples, flattened and joined batch after batch (so an output
    whose batch axis is not the first one compares element for element too), and the
    shapes of the outputs of the first batch."""
    static = {i.shape[model.batch_axis(i.name) or 0] for i in sess.get_inputs()
              if model.batch_axis(i.name) is not None and i.shape}
    size = 1 if static == {1} else 8
    parts = [[np.asarray(o) for o in sess.run(None, feed)]
             for feed in batches(model, arrays, size)]
    joined = [np.concatenate([p[i].reshape(-1) for p in parts]) for i in range(len(parts[0]))]
    return joined, [o.shape for o in parts[0]]


def recheck(original: Path, optimized: Path, model: CorpusModel, arrays: dict[str, np.ndarray],
            atol: float = 1e-5) -> Recheck:
    """Compare the outputs of ``optimized`` with those of ``original`` on ``arrays``."""
    ref, shapes = run(session(original), model, arrays)
    got, _ = run(session(optimized), model, arrays)
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got, strict=False)):
        return Recheck(float("inf"), float("inf"), float("-inf"), None, 0)
    max_abs, needed, noise, signal = 0.0, 0.0, 0.0, 0.0
    for r, g in zip(ref, got, strict=True):
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        diff = np.abs(g64 - r64)
        if not np.all(np.isfinite(diff)):
            return Recheck(float("inf"), float("inf"), float("-inf"), None, 0)
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            slack = np.maximum(diff - atol * float(np.abs(r64).max()), 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(slack > 0, slack / np.abs(r64), 0.0)
            needed = max(needed, float(np.nanmax(np.where(np.isnan(ratio), np.inf, ratio))))
        noise += float(np.sum(diff**2))
        signal += float(np.sum(r64**2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal else -np.inf
    agreement = None
    if model.classifier:
        classes = shapes[0][1] if len(shapes[0]) >= 2 else 0
        if classes > 1:
            a = ref[0].reshape(-1, classes).argmax(1)
            b = got[0].reshape(-1, classes).argmax(1)
            agreement = float(np.mean(a == b))
    samples = len(batches(model, arrays, 1))
    return Recheck(max_abs, needed, float(sqnr), agreement, samples)
