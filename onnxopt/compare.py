"""Compare model outputs: tolerances, error metrics, agreement and accuracy.

A :class:`Comparison` is truthy when every output is within tolerance and says which
tolerance would have been needed (as Polygraphy's comparator does). Running the models is
:mod:`onnxopt.session`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxopt.pass_base import Tolerance


def as_comparable(output: object) -> np.ndarray:
    """An onnxruntime output as one array: sequences are flattened and joined.

    Sequence and map outputs (lists and dicts) have no common array form; for comparison
    their elements are concatenated in order, which keeps every value and its position.
    """
    if isinstance(output, np.ndarray):
        return output
    if isinstance(output, dict):
        output = [output[k] for k in sorted(output)]
    if isinstance(output, list):
        parts = [as_comparable(o).reshape(-1) for o in output]
        if not parts:
            return np.zeros(0, np.float32)
        if all(p.dtype.kind in "biuf" for p in parts):
            return np.concatenate([p.astype(np.float64) for p in parts])
        return np.concatenate([p.astype(object) for p in parts])
    return np.asarray(output)


@dataclass
class OutputMetrics:
    """How far one output moved from its reference."""

    name: str
    max_abs_error: float
    needed_rtol: float
    cosine: float
    sqnr_db: float
    agreement: float | None = None


@dataclass
class Comparison:
    """Result of comparing a model's outputs to reference outputs.

    Truthy when every output is within tolerance; ``needed_rtol`` says what tolerance
    would have made it pass (in the style of Polygraphy's comparator).
    """

    passed: bool
    tolerance: Tolerance
    outputs: list[OutputMetrics] = field(default_factory=list)
    accuracy: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def needed_rtol(self) -> float:
        return max((o.needed_rtol for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=float("inf"))

    @property
    def agreement(self) -> float | None:
        values = [o.agreement for o in self.outputs if o.agreement is not None]
        return min(values) if values else None

    def summary(self) -> str:
        """One line for logs and error messages."""
        text = (f"max abs err {self.max_abs_error:.3g}, needed rtol {self.needed_rtol:.3g} "
                f"(allowed {self.tolerance.rtol:g}), cosine {self.cosine:.6f}")
        if self.agreement is not None:
            text += f", top-1 agreement {self.agreement:.4f}"
        return text


def classifier_like(array: np.ndarray) -> bool:
    """Whether an output looks like per-sample class scores (``[N, C]`` with C > 1)."""
    return array.ndim == 2 and array.shape[1] > 1 and np.issubdtype(array.dtype, np.floating)


def compare_outputs(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    names: Sequence[str],
    tolerance: Tolerance | None = None,
    labels: np.ndarray | None = None,
) -> Comparison:
    """Compare two output lists elementwise.

    An element passes when ``|a - r| <= atol * max|r| + rtol * |r|``. NaN in the
    actual output where the reference is finite always fails.
    """
    tolerance = tolerance or Tolerance()
    result = Comparison(passed=True, tolerance=tolerance)
    if len(reference) != len(actual):
        result.passed = False
        return result
    for name, ref, act in zip(names, reference, actual, strict=True):
        ref_f = np.asarray(ref)
        act_f = np.asarray(act)
        if ref_f.shape != act_f.shape:
            result.passed = False
            result.outputs.append(OutputMetrics(name, float("inf"), float("inf"), 0.0, -np.inf))
            continue
        if not np.issubdtype(ref_f.dtype, np.number) and ref_f.dtype != np.bool_:
            same = bool(np.array_equal(ref_f, act_f))
            result.passed &= same
            err = 0.0 if same else float("inf")
            result.outputs.append(OutputMetrics(name, err, err, 1.0 if same else 0.0, np.inf))
            continue
        metrics = _metrics(name, ref_f.astype(np.float64), act_f.astype(np.float64), tolerance)
        if classifier_like(ref_f):
            metrics.agreement = float(np.mean(ref_f.argmax(1) == act_f.argmax(1)))
        result.passed &= metrics.needed_rtol <= tolerance.rtol
        result.outputs.append(metrics)
    if labels is not None:
        result.accuracy = accuracy_of(actual, labels)
    return result


def _metrics(name: str, ref: np.ndarray, act: np.ndarray, tol: Tolerance) -> OutputMetrics:
    finite = np.isfinite(ref)
    same_nonfinite = np.array_equal(np.isnan(ref), np.isnan(act)) and np.array_equal(
        ref[~finite & ~np.isnan(ref)], act[~finite & ~np.isnan(ref)])
    if not same_nonfinite or not np.all(np.isfinite(act[finite])):
        return OutputMetrics(name, float("inf"), float("inf"), 0.0, -np.inf)
    r, a = ref[finite], act[finite]
    if r.size == 0:
        return OutputMetrics(name, 0.0, 0.0, 1.0, np.inf)
    diff = np.abs(a - r)
    scale = float(np.max(np.abs(r)))
    slack = np.maximum(diff - tol.atol * scale, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.where(slack > 0, slack / np.abs(r), 0.0)
    needed_rtol = float(np.max(needed)) if needed.size else 0.0
    noise = float(np.sum(diff**2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        sqnr = float("inf")
    elif signal == 0.0:
        sqnr = float("-inf")
    else:
        sqnr = 10.0 * np.log10(signal / noise)
    denom = float(np.linalg.norm(r) * np.linalg.norm(a))
    if denom:
        cosine = float(np.dot(r, a) / denom)
    else:
        cosine = 1.0 if noise == 0.0 else 0.0
    return OutputMetrics(name, float(diff.max()), needed_rtol, cosine, sqnr)


def accuracy_of(outputs: Sequence[np.ndarray], labels: np.ndarray) -> float | None:
    """Top-1 accuracy of the first classifier-like output against ``labels``."""
    for out in outputs:
        arr = np.asarray(out)
        if classifier_like(arr) and arr.shape[0] == len(labels):
            return float(np.mean(arr.argmax(1) == np.asarray(labels).reshape(-1)))
    return None


#: Minimum tolerances for low-precision outputs: a few units in the last place.
_LOW_PRECISION = {np.dtype(np.float16): Tolerance(rtol=4e-3, atol=4e-3)}


def scaled_tolerance(tolerance: Tolerance, outputs: Sequence[np.ndarray]) -> Tolerance:
    """Widen ``tolerance`` to what the outputs' dtype can represent (float16, bfloat16)."""
    rtol, atol = tolerance.rtol, tolerance.atol
    for out in outputs:
        dtype = np.asarray(out).dtype
        floor = _LOW_PRECISION.get(dtype)
        if floor is None and dtype.name == "bfloat16":
            floor = Tolerance(rtol=3e-2, atol=3e-2)
        if floor is not None:
            rtol, atol = max(rtol, floor.rtol), max(atol, floor.atol)
    return Tolerance(rtol=rtol, atol=atol)
