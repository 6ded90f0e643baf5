"""Exit heads, plans and reports: what a staged model is made of and how it did on data.

:func:`collect_features` runs the full model once over a data set and keeps the pooled cut
tensors and the outputs; :mod:`.planning` fits the heads and chooses the thresholds from them.
:func:`simulate` replays a plan on such features in numpy. The report per exit
(:class:`StagedReport`) gives the share of samples answered there, their agreement with the
full model and accuracy, the expected MACs per sample (heads included) and the promise the
thresholds were chosen to keep.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.compare import classifier_like
from onnxopt.data import FeedSource
from onnxopt.errors import DataError, UserError
from onnxopt.passes.early_exit.cuts import CutPoint
from onnxopt.passes.early_exit.guarantee import Guarantee
from onnxopt.passes.early_exit.heads import PoolKind, margin, pool, pooling
from onnxopt.report import plural
from onnxopt.session import batch_within, stream_tensors

logger = logging.getLogger(__name__)


class ExitPlanError(UserError):
    """The model cannot get useful early exits (wrong outputs, or no exit meets the target)."""


@dataclass
class ExitHead:
    """One exit: where it reads, its linear head, and when it answers.

    Attributes:
        cut: Name of the cut tensor the head reads.
        weight: Gemm weight ``[K, F]`` (used with ``transB=1``).
        bias: Gemm bias ``[K]``.
        threshold: Exit when the margin between the top two logits is at least this.
        macs_before: MACs per sample of the model up to the cut.
        macs: MACs per sample of the head itself.
        rank: Rank of the cut tensor (2 means no pooling).
        pooling: ``none``, ``avg`` or ``grid`` (see :mod:`.heads`).
        temperature: Divides the margin into the calibrated score the level applies to.
        window: Kernel (and stride) of the ``grid`` pooling: half the cut's spatial dims.
    """

    cut: str
    weight: np.ndarray
    bias: np.ndarray
    threshold: float
    macs_before: int
    macs: int
    rank: int
    pooling: str = "avg"
    temperature: float = 1.0
    window: tuple[int, ...] = ()

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Head output for pooled features ``[n, F]``, computed as onnxruntime would (fp32)."""
        return features.astype(np.float32) @ self.weight.T + self.bias

    def score(self, features: np.ndarray) -> np.ndarray:
        """Calibrated confidence: the margin of the top two logits over the temperature."""
        return margin(self.logits(features)).astype(np.float64) / self.temperature

    def takes(self, features: np.ndarray) -> np.ndarray:
        """Which samples answer here, as the ONNX head decides (margin >= threshold)."""
        return margin(self.logits(features)) >= np.float32(self.threshold)


@dataclass
class ExitRow:
    """Outcome at one exit (or at the full model, the last row)."""

    name: str
    cut: str
    threshold: float | None
    fraction: float
    agreement: float | None
    accuracy: float | None
    macs: int


@dataclass
class StagedReport:
    """How the staged model did on a data set, per exit and overall."""

    rows: list[ExitRow]
    samples: int
    agreement: float
    accuracy: float | None
    full_accuracy: float | None
    expected_macs: float
    total_macs: int
    source: str = ""
    promise: str = ""

    @property
    def macs_ratio(self) -> float:
        """Expected MACs per sample relative to the full model."""
        return self.expected_macs / self.total_macs if self.total_macs else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "source": self.source, "samples": self.samples, "agreement": self.agreement,
            "accuracy": self.accuracy, "full_accuracy": self.full_accuracy,
            "expected_macs": self.expected_macs, "total_macs": self.total_macs,
            "macs_ratio": self.macs_ratio, "promise": self.promise,
            "exits": [vars(r).copy() for r in self.rows],
        }

    def format_table(self) -> str:
        """Per-exit table, a summary line and the promise, for the CLI."""
        lines = [f"{'exit':<8} {'cut':<24} {'thresh':>7} {'exits':>7} {'agree':>7} "
                 f"{'acc':>7} {'MACs':>8}"]
        for r in self.rows:
            lines.append(
                f"{r.name:<8} {r.cut[:24]:<24} {_fmt(r.threshold, '.3f'):>7} "
                f"{100 * r.fraction:6.1f}% {_fmt(r.agreement, '.4f'):>7} "
                f"{_fmt(r.accuracy, '.2%'):>7} {r.macs / max(self.total_macs, 1):7.2f}x")
        acc = "" if self.accuracy is None else (
            f", accuracy {self.accuracy:.2%} (full model {_fmt(self.full_accuracy, '.2%')})")
        lines.append(f"{plural(self.samples, 'sample')} from {self.source or 'data'}: measured "
                     f"agreement {self.agreement:.4f}{acc}, expected MACs "
                     f"{self.macs_ratio:.3f}x")
        if self.promise:
            lines.append(self.promise)
        return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class ExitPlan:
    """Everything needed to build the staged model: cuts, heads and thresholds.

    Attributes:
        inputs: Model input names.
        output: The classifier output name.
        classes: Number of classes (width of the output).
        total_macs: MACs per sample of the full model.
        target: Agreement target the thresholds were chosen for.
        heads: The exits that fire, in execution order.
        dropped: Candidate cut names left out, each with the reason.
        calib_report: Outcome on the held-out threshold samples.
        guarantee: What the thresholds promise (:mod:`.guarantee`).
    """

    inputs: list[str]
    output: str
    classes: int
    total_macs: int
    target: float
    heads: list[ExitHead]
    dropped: dict[str, str] = field(default_factory=dict)
    calib_report: StagedReport | None = None
    guarantee: Guarantee | None = None

    @property
    def cuts(self) -> list[str]:
        return [h.cut for h in self.heads]

    def exit_macs(self) -> list[int]:
        """MACs per sample when answering at exit k; the last entry is the full path."""
        macs, heads = [], 0
        for head in self.heads:
            heads += head.macs
            macs.append(head.macs_before + heads)
        macs.append(self.total_macs + heads)
        return macs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (weights left out)."""
        return {
            "output": self.output, "target": self.target, "total_macs": self.total_macs,
            "guarantee": None if self.guarantee is None else self.guarantee.to_dict(),
            "promise": "" if self.guarantee is None else self.guarantee.describe(),
            "exits": [{"cut": h.cut, "threshold": h.threshold, "temperature": h.temperature,
                       "pooling": h.pooling, "macs_before": h.macs_before,
                       "head_macs": h.macs} for h in self.heads],
            "dropped": dict(self.dropped),
            "calibration": None if self.calib_report is None else self.calib_report.to_dict(),
        }


@dataclass
class Features:
    """Pooled cut features (by cut name) and the full model's outputs on a data set."""

    pooled: dict[str, np.ndarray]
    logits: np.ndarray
    labels: np.ndarray | None
    source: str

    def subset(self, index: np.ndarray, source: str | None = None) -> Features:
        """The same features for the samples at ``index``."""
        return Features({k: v[index] for k, v in self.pooled.items()}, self.logits[index],
                        None if self.labels is None else self.labels[index],
                        self.source if source is None else source)

    def __len__(self) -> int:
        return len(self.logits)


def collect_features(model: ir.Model, source: FeedSource, cuts: Sequence[CutPoint], *,
                     pool_kind: PoolKind = "grid",
                     input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                     batch_size: int = 64, limit: int | None = None) -> Features:
    """Run the model once over ``source`` and keep pooled cut tensors and the outputs.

    Raises:
        ExitPlanError: The model does not have exactly one classifier-like output.
        DataError: The source yields no samples or does not fit the model.
    """
    if len(model.graph.outputs) != 1:
        raise ExitPlanError(f"early exit needs a model with one output, this one has "
                            f"{len(model.graph.outputs)}")
    output = model.graph.outputs[0].name or ""
    kinds = {c.name: pooling(c.shape, pool_kind) for c in cuts}
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    logits, labels = [], []
    # the cut tensors are whole feature maps until pooled: a batch takes what fits in memory
    batch_size = batch_within(model, [output, *kinds], source, batch_size,
                              input_shapes=input_shapes)
    for (tensors,), batch_labels in stream_tensors([model], [[output, *kinds]], source,
                                                   batch_size=batch_size, limit=limit,
                                                   input_shapes=input_shapes):
        logits.append(tensors[output])
        labels.append(batch_labels)
        for name, kind in kinds.items():
            pooled[name].append(pool(tensors[name], kind))
    if not logits:
        raise DataError(f"{source.description}: no samples")
    full = np.concatenate(logits)
    if not classifier_like(full):
        raise ExitPlanError(f"early exit needs a classifier output [N, classes]; output "
                            f"{model.graph.outputs[0].name!r} has shape {list(full.shape)}")
    has_labels = all(lab is not None for lab in labels)
    return Features({k: np.concatenate(v) for k, v in pooled.items()}, full,
                    np.concatenate(labels).reshape(-1) if has_labels else None,
                    source.description)


def exit_capable(point: CutPoint) -> bool:
    """Whether a head can read this cut: a known shape of rank 2 or more."""
    return point.shape is not None and len(point.shape) >= 2 and isinstance(point.shape[1], int)


def simulate(plan: ExitPlan, features: Features) -> StagedReport:
    """The staged model's outcome on pooled features, computed in numpy."""
    full_top1 = features.logits.argmax(axis=1)
    exit_index = np.full(len(full_top1), len(plan.heads))
    staged = full_top1.copy()
    for k in reversed(range(len(plan.heads))):
        x = features.pooled[plan.heads[k].cut]
        take = plan.heads[k].takes(x)
        exit_index[take] = k
        staged[take] = plan.heads[k].logits(x).argmax(axis=1)[take]
    return staged_report(plan, exit_index, staged, full_top1, features.labels, features.source)


def staged_report(plan: ExitPlan, exit_index: np.ndarray, staged_top1: np.ndarray,
                  full_top1: np.ndarray, labels: np.ndarray | None,
                  source: str = "") -> StagedReport:
    """Per-exit fractions, agreement and accuracy from where each sample exited.

    Args:
        plan: The plan (for exit names, thresholds, MACs and the promise).
        exit_index: Per sample, the exit that answered (``len(plan.heads)`` = full model).
        staged_top1: Per sample, the staged model's class.
        full_top1: Per sample, the full model's class.
        labels: True classes, if known.
        source: Where the samples came from.
    """
    n = len(exit_index)
    macs = plan.exit_macs()
    rows = []
    names = [f"exit {k + 1}" for k in range(len(plan.heads))] + ["full"]
    cuts = [h.cut for h in plan.heads] + [plan.output]
    thresholds: list[float | None] = [h.threshold for h in plan.heads] + [None]
    for k in range(len(plan.heads) + 1):
        there = exit_index == k
        count = int(there.sum())
        rows.append(ExitRow(
            names[k], cuts[k], thresholds[k], count / n if n else 0.0,
            float(np.mean(staged_top1[there] == full_top1[there])) if count else None,
            float(np.mean(staged_top1[there] == labels[there]))
            if count and labels is not None else None,
            macs[k]))
    expected = float(sum(r.fraction * r.macs for r in rows))
    return StagedReport(
        rows, n, float(np.mean(staged_top1 == full_top1)) if n else 1.0,
        float(np.mean(staged_top1 == labels)) if labels is not None and n else None,
        float(np.mean(full_top1 == labels)) if labels is not None and n else None,
        expected, plan.total_macs, source,
        "" if plan.guarantee is None else plan.guarantee.describe())
