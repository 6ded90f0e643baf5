"""Compare model outputs: tolerances, error metrics, agreement and accuracy.

A :class:`Comparison` is truthy when every output is within tolerance and says which
tolerance would have been needed (as Polygraphy's comparator does). Running the models is
:mod:`onnxopt.session`'s job.
"""

from __future__ import annotations

import math
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
    floating: bool = True
    noise: float | None = None


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
    noise_multiple: float | None = None

    @property
    def noise_floor(self) -> float | None:
        """Largest runtime noise (max abs error) of any output, when one was measured."""
        values = [o.noise for o in self.outputs if o.noise is not None]
        return max(values) if values else None

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
        allowed = f"allowed {self.tolerance.rtol:g}"
        if self.noise_multiple is not None and self.noise_floor is not None:
            allowed += (f", or {self.noise_multiple:g}x onnxruntime's own noise "
                        f"{self.noise_floor:.3g}")
        text = (f"max abs err {self.max_abs_error:.3g}, needed rtol {self.needed_rtol:.3g} "
                f"({allowed}), cosine {self.cosine:.6f}")
        if self.agreement is not None:
            text += f", top-1 agreement {self.agreement:.4f}"
        return text


def class_sequence_like(array: np.ndarray) -> bool:
    """Whether an output is a sequence of class distributions per sample (``[N, T, C]``).

    Such as a text recognizer's per-step softmax read by CTC: float, every row of the last
    axis a probability distribution (values in [0, 1] summing to 1). Box or feature
    tensors of the same rank are not distributions and are not matched.
    """
    if array.ndim != 3 or array.shape[2] < 2 or not np.issubdtype(array.dtype, np.floating) \
            or array.size == 0:
        return False
    if float(array.min()) < 0.0 or float(array.max()) > 1.0:
        return False
    return bool(np.allclose(array.sum(axis=2, dtype=np.float64), 1.0, atol=1e-3))


def same_top1(ref: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Per sample, whether ``act`` gives ``ref``'s answer: the same argmax over the last axis
    (``[N, C]``), or for a sequence (``[N, T, C]``) the same argmax at every step, since the
    same path is the same decoded sequence (stricter than comparing decoded text)."""
    same = ref.argmax(-1) == act.argmax(-1)
    return same.reshape(same.shape[0], -1).all(axis=1)


def classifier_like(array: np.ndarray) -> bool:
    """Whether an output looks like per-sample class scores (``[N, C]`` with C > 1)."""
    return array.ndim == 2 and array.shape[1] > 1 and np.issubdtype(array.dtype, np.floating)


def compare_outputs(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    names: Sequence[str],
    tolerance: Tolerance | None = None,
    labels: np.ndarray | None = None,
    noise: Sequence[float] | None = None,
    noise_multiple: float = 0.0,
) -> Comparison:
    """Compare two output lists elementwise.

    An element passes when ``|a - r| <= atol * max|r| + rtol * |r|``. NaN in the
    actual output where the reference is finite always fails.

    Args:
        reference: The reference outputs.
        actual: The outputs to judge.
        names: Output names, for the metrics.
        tolerance: The declared tolerance.
        labels: Labels, for accuracy.
        noise: Per output, the largest absolute difference the runtime itself makes
            between two exact forms of the reference model (see :func:`runtime_noise`).
            An element also passes when its error is within ``noise_multiple`` times
            that noise, so an exact rewrite is never held tighter than the runtime's
            own exact rewrites.
        noise_multiple: How many times the noise an exact rewrite may add.
    """
    tolerance = tolerance or Tolerance()
    result = Comparison(passed=True, tolerance=tolerance,
                        noise_multiple=noise_multiple if noise is not None else None)
    if len(reference) != len(actual):
        result.passed = False
        return result
    noises: Sequence[float | None] = list(noise) if noise is not None else [None] * len(names)
    for name, ref, act, out_noise in zip(names, reference, actual, noises, strict=True):
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
        metrics = _metrics(name, ref_f, act_f,
                           _with_noise(tolerance, ref_f, out_noise, noise_multiple))
        metrics.floating = bool(np.issubdtype(ref_f.dtype, np.floating))
        metrics.noise = out_noise
        if classifier_like(ref_f) or class_sequence_like(ref_f):
            metrics.agreement = float(np.mean(same_top1(ref_f, act_f)))
        result.passed &= metrics.needed_rtol <= tolerance.rtol
        result.outputs.append(metrics)
    if labels is not None:
        result.accuracy = accuracy_of(actual, labels)
    return result


def _with_noise(tolerance: Tolerance, ref: np.ndarray, noise: float | None,
                multiple: float) -> Tolerance:
    """``tolerance`` with its ``atol`` raised to ``multiple`` times the runtime's noise."""
    if not noise or not multiple:
        return tolerance
    finite = ref[np.isfinite(ref)] if ref.dtype.kind == "f" else ref
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    if scale == 0.0:
        return tolerance
    return Tolerance(rtol=tolerance.rtol, atol=max(tolerance.atol, multiple * noise / scale))


def runtime_noise(optimized: Sequence[np.ndarray], plain: Sequence[np.ndarray]) -> list[float]:
    """Per output, the max abs difference between two runs the runtime calls exact.

    ``optimized`` and ``plain`` are the same model's outputs under onnxruntime with all
    graph optimizations and with none: fusions and layout changes that onnxruntime
    itself treats as exact. Their difference is the float-rounding noise of the model on
    this data; non-float and non-finite entries contribute nothing.
    """
    noise = []
    for a, b in zip(optimized, plain, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != "f":
            noise.append(0.0)
            continue
        both = np.isfinite(a) & np.isfinite(b)
        diff = np.abs(a[both].astype(np.float64) - b[both].astype(np.float64))
        noise.append(float(diff.max()) if diff.size else 0.0)
    return noise


def sqnr_db(signal: float, noise: float) -> float:
    """SQNR in dB from summed squares of the reference and of the error (inf without error,
    -inf for an all-zero reference with error)."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _metrics(name: str, ref: np.ndarray, act: np.ndarray, tol: Tolerance) -> OutputMetrics:
    """Error metrics of ``act`` against ``ref``; float32 work, float64 sums (large outputs)."""
    small_floats = all(x.dtype.kind == "f" and x.dtype.itemsize <= 4 for x in (ref, act))
    work = np.float32 if small_floats else np.float64
    ref = np.asarray(ref, dtype=work).reshape(-1)
    act = np.asarray(act, dtype=work).reshape(-1)
    finite = np.isfinite(ref)
    if not finite.all():
        nan = np.isnan(ref)
        inf = ~finite & ~nan
        if not (np.array_equal(nan, np.isnan(act)) and np.array_equal(ref[inf], act[inf])):
            return OutputMetrics(name, float("inf"), float("inf"), 0.0, -np.inf)
        ref, act = ref[finite], act[finite]
    if not np.isfinite(act).all():
        return OutputMetrics(name, float("inf"), float("inf"), 0.0, -np.inf)
    if ref.size == 0:
        return OutputMetrics(name, 0.0, 0.0, 1.0, np.inf)
    diff = np.abs(act - ref)
    scale = float(np.max(np.abs(ref)))
    floor = tol.atol * scale
    over = np.flatnonzero(diff > floor)
    needed_rtol = 0.0
    if over.size:
        with np.errstate(divide="ignore"):
            needed = (diff[over].astype(np.float64) - floor) / np.abs(ref[over])
        needed_rtol = float(np.max(needed))
    diff64 = diff.astype(np.float64)
    ref64 = ref.astype(np.float64)
    act64 = act.astype(np.float64)
    noise = float(np.dot(diff64, diff64))
    signal = float(np.dot(ref64, ref64))
    sqnr = sqnr_db(signal, noise)
    denom = float(np.sqrt(signal * float(np.dot(act64, act64))))
    if denom:
        cosine = float(np.dot(ref64, act64) / denom)
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


@dataclass(frozen=True)
class QualityFloor:
    """The least a lossy pass must keep of the original model's outputs.

    A classifier-like output (``[N, C]`` scores) must keep top-1 agreement with the
    original of at least ``min_agreement``, and so must a sequence of class distributions
    (``[N, T, C]``, e.g. a CTC text recognizer), whose samples agree when their whole
    per-step argmax path does; any other float output (maps, boxes,
    embeddings, probabilities) must keep an SQNR of at least ``min_sqnr_db`` (10 dB is a
    cosine of about 0.95). Integer and non-numeric outputs have no floor of their own.
    The defaults catch destroyed models (agreement near chance, SQNR near or below
    0 dB) and are cleared with margin by correct int8 and moderate pruning.

    Attributes:
        min_agreement: Floor for classifier-like outputs (0 removes it).
        min_sqnr_db: Floor for other float outputs, in dB (``-inf`` removes it).
        agreement_given: The user set ``min_agreement`` (else it is the default).
        sqnr_given: The user set ``min_sqnr_db``.
    """

    min_agreement: float = 0.9
    min_sqnr_db: float = 10.0
    agreement_given: bool = False
    sqnr_given: bool = False

    def describe(self) -> str:
        """The floor as one phrase for reports."""
        parts = []
        if self.min_agreement > 0:
            parts.append(f"top-1 agreement >= {self.min_agreement:g} for classifier outputs"
                         + ("" if self.agreement_given else " (default)"))
        if self.min_sqnr_db > -np.inf:
            parts.append(f"SQNR >= {self.min_sqnr_db:g} dB for other float outputs"
                         + ("" if self.sqnr_given else " (default)"))
        return ", ".join(parts) if parts else "none"

    def violation(self, cmp: Comparison) -> str | None:
        """Why ``cmp`` (against the original) falls below the floor, or None."""
        for out in cmp.outputs:
            if out.agreement is not None:
                if out.agreement < self.min_agreement:
                    return (f"output '{out.name}': top-1 agreement {out.agreement:.4f} is "
                            f"below --min-agreement {self.min_agreement:g}"
                            + ("" if self.agreement_given else _DEFAULT_HINT))
            elif out.floating and out.sqnr_db < self.min_sqnr_db:
                return (f"output '{out.name}': SQNR {out.sqnr_db:.1f} dB (cosine "
                        f"{out.cosine:.3f}) is below --min-sqnr {self.min_sqnr_db:g}"
                        + ("" if self.sqnr_given else _DEFAULT_HINT))
        return None


_DEFAULT_HINT = (", the default quality floor (lower it with that option, or "
                 "--no-quality-floor)")
