"""Early-exit planning: exit heads at cut points and thresholds for an agreement target.

For each chosen cut the full model is run once over the calibration data, keeping the pooled
cut tensors and the outputs; a linear head (:mod:`.heads`) is fitted at each cut against the
full model's logits (soft targets) or the labels.

Thresholds. Exits are taken in order; exit k sees the calibration samples no earlier exit took
and takes those whose confidence is at least ``t_k``. ``t_k`` is the lowest value for which the
samples it takes agree with the full model's top-1 class on at least ``target`` of them, so the
staged model as a whole agrees on at least ``target`` too. The confidences used for this choice
are out-of-fold (each from a head fitted without that sample), so they are not inflated by
fitting and testing on the same data. An exit that takes no sample is dropped.

The report per exit (:class:`StagedReport`) gives the share of samples answered there, their
agreement with the full model and accuracy, and the expected MACs per sample, heads included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.compare import classifier_like
from onnxopt.data import FeedSource
from onnxopt.errors import DataError, UserError
from onnxopt.passes.early_exit.cuts import CutPoint
from onnxopt.passes.early_exit.heads import (
    HeadKind,
    choose_threshold,
    fit_head,
    head_macs,
    pool,
    softmax,
)
from onnxopt.report import plural
from onnxopt.session import batch_within, stream_tensors

logger = logging.getLogger(__name__)

FitTarget = Literal["logits", "labels"]


class ExitPlanError(UserError):
    """The model cannot get useful early exits (wrong outputs, or no exit meets the target)."""


@dataclass
class ExitHead:
    """One exit: where it reads, its linear head, and when it answers.

    Attributes:
        cut: Name of the cut tensor the head reads.
        weight: Gemm weight ``[K, C]`` (used with ``transB=1``).
        bias: Gemm bias ``[K]``.
        threshold: Exit when the top softmax probability is at least this.
        macs_before: MACs per sample of the model up to the cut.
        macs: MACs per sample of the head itself.
        rank: Rank of the cut tensor (2 means no pooling).
    """

    cut: str
    weight: np.ndarray
    bias: np.ndarray
    threshold: float
    macs_before: int
    macs: int
    rank: int

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Head output for pooled features ``[n, C]``, computed as onnxruntime would (fp32)."""
        return features.astype(np.float32) @ self.weight.T + self.bias


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
            "macs_ratio": self.macs_ratio,
            "exits": [vars(r).copy() for r in self.rows],
        }

    def format_table(self) -> str:
        """Per-exit table and a summary line, for the CLI."""
        lines = [f"{'exit':<8} {'cut':<24} {'thresh':>7} {'exits':>7} {'agree':>7} "
                 f"{'acc':>7} {'MACs':>8}"]
        for r in self.rows:
            lines.append(
                f"{r.name:<8} {r.cut[:24]:<24} {_fmt(r.threshold, '.4f'):>7} "
                f"{100 * r.fraction:6.1f}% {_fmt(r.agreement, '.4f'):>7} "
                f"{_fmt(r.accuracy, '.2%'):>7} {r.macs / max(self.total_macs, 1):7.2f}x")
        acc = "" if self.accuracy is None else (
            f", accuracy {self.accuracy:.2%} (full model {_fmt(self.full_accuracy, '.2%')})")
        lines.append(f"{plural(self.samples, 'sample')} from {self.source or 'data'}: agreement "
                     f"{self.agreement:.4f}{acc}, expected MACs {self.macs_ratio:.3f}x")
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
        dropped: Cut names whose exit never met the target and was dropped.
        calib_report: Out-of-fold outcome on the calibration data.
    """

    inputs: list[str]
    output: str
    classes: int
    total_macs: int
    target: float
    heads: list[ExitHead]
    dropped: list[str] = field(default_factory=list)
    calib_report: StagedReport | None = None

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
            "exits": [{"cut": h.cut, "threshold": h.threshold, "macs_before": h.macs_before,
                       "head_macs": h.macs} for h in self.heads],
            "dropped": list(self.dropped),
            "calibration": None if self.calib_report is None else self.calib_report.to_dict(),
        }


@dataclass
class Features:
    """Pooled cut features and the full model's outputs on a data set."""

    pooled: list[np.ndarray]
    logits: np.ndarray
    labels: np.ndarray | None
    source: str


def collect_features(model: ir.Model, source: FeedSource, cuts: Sequence[str], *,
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
    pooled: list[list[np.ndarray]] = [[] for _ in cuts]
    logits, labels = [], []
    # the cut tensors are whole feature maps until pooled: a batch takes what fits in memory
    batch_size = batch_within(model, [output, *cuts], source, batch_size,
                              input_shapes=input_shapes)
    for (tensors,), batch_labels in stream_tensors([model], [[output, *cuts]], source,
                                                   batch_size=batch_size, limit=limit,
                                                   input_shapes=input_shapes):
        logits.append(tensors[output])
        labels.append(batch_labels)
        for k, name in enumerate(cuts):
            pooled[k].append(pool(tensors[name]))
    if not logits:
        raise DataError(f"{source.description}: no samples")
    full = np.concatenate(logits)
    if not classifier_like(full):
        raise ExitPlanError(f"early exit needs a classifier output [N, classes]; output "
                            f"{model.graph.outputs[0].name!r} has shape {list(full.shape)}")
    has_labels = all(lab is not None for lab in labels)
    return Features([np.concatenate(p) for p in pooled], full,
                    np.concatenate(labels).reshape(-1) if has_labels else None,
                    source.description)


def exit_capable(point: CutPoint) -> bool:
    """Whether a head can read this cut: a known shape of rank 2 or more."""
    return point.shape is not None and len(point.shape) >= 2 and isinstance(point.shape[1], int)


def _targets(features: Features, kind: HeadKind, fit_to: FitTarget) -> np.ndarray:
    if fit_to == "labels":
        if features.labels is None:
            raise DataError(f"fit_to=labels needs labels in the calibration data "
                            f"({features.source} has none)")
        return np.eye(features.logits.shape[1])[features.labels.astype(int)]
    return features.logits if kind == "ridge" else softmax(features.logits)


def _out_of_fold(x: np.ndarray, y: np.ndarray, kind: HeadKind, l2: float, folds: int,
                 seed: int) -> np.ndarray:
    """Head logits for every sample from a head fitted on the other folds."""
    n = len(x)
    folds = min(folds, n // 2)
    if folds < 2:
        w, b = fit_head(x, y, kind, l2)
        return x.astype(np.float32) @ w.T + b
    order = np.random.default_rng(seed).permutation(n)
    result = np.empty((n, y.shape[1]), dtype=np.float32)
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        w, b = fit_head(x[train], y[train], kind, l2)
        result[part] = x[part].astype(np.float32) @ w.T + b
    return result


def plan_exits(model: ir.Model, calib: FeedSource, cuts: Sequence[CutPoint], *,
               target: float = 0.99, head: HeadKind = "ridge", fit_to: FitTarget = "logits",
               l2: float = 1e-3, folds: int = 5, seed: int = 0,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None,
               batch_size: int = 64, limit: int | None = None) -> ExitPlan:
    """Fit a head at each cut and choose thresholds for ``target`` agreement.

    Raises:
        ExitPlanError: The model output is not a single classifier output, or no exit can
            answer any calibration sample at the target.
        DataError: The calibration data does not fit, or labels are needed but missing.
    """
    if not 0.0 < target <= 1.0:
        raise UserError(f"target must be in (0, 1], got {target}")
    features = collect_features(model, calib, [c.name for c in cuts],
                                input_shapes=input_shapes, batch_size=batch_size, limit=limit)
    y = _targets(features, head, fit_to)
    full_top1 = features.logits.argmax(axis=1)
    classes = features.logits.shape[1]
    total = cuts[0].total_macs if cuts else 0
    remaining = np.ones(len(full_top1), dtype=bool)
    heads: list[ExitHead] = []
    dropped: list[str] = []
    oof_top1: list[np.ndarray] = []
    oof_take: list[np.ndarray] = []
    for cut, x in zip(cuts, features.pooled, strict=True):
        oof = _out_of_fold(x, y, head, l2, folds, seed)
        conf = softmax(oof).max(axis=1)
        agrees = oof.argmax(axis=1) == full_top1
        threshold = choose_threshold(conf[remaining], agrees[remaining], target)
        if threshold is None:
            logger.info("exit at %s dropped: no threshold meets agreement %s", cut.name, target)
            dropped.append(cut.name)
            continue
        weight, bias = fit_head(x, y, head, l2)
        heads.append(ExitHead(cut.name, weight, bias, threshold, cut.macs_before,
                              head_macs(cut.shape, classes), len(cut.shape or ())))
        take = remaining & (conf >= threshold)
        oof_top1.append(oof.argmax(axis=1))
        oof_take.append(take)
        remaining &= ~take
    if not heads:
        raise ExitPlanError(f"no exit reaches agreement {target} with the full model on any "
                            f"calibration sample at cuts {', '.join(c.name for c in cuts)}")
    plan = ExitPlan([v.name or "" for v in model.graph.inputs if not v.is_initializer()],
                    model.graph.outputs[0].name or "", classes, total, target, heads, dropped)
    exit_index = np.full(len(full_top1), len(heads))
    staged = full_top1.copy()
    for k in reversed(range(len(heads))):
        exit_index[oof_take[k]] = k
        staged[oof_take[k]] = oof_top1[k][oof_take[k]]
    plan.calib_report = staged_report(plan, exit_index, staged, full_top1, features.labels,
                                      f"{features.source} (out-of-fold)")
    return plan


def simulate(plan: ExitPlan, features: Features) -> StagedReport:
    """The staged model's outcome on pooled features, computed in numpy."""
    full_top1 = features.logits.argmax(axis=1)
    exit_index = np.full(len(full_top1), len(plan.heads))
    staged = full_top1.copy()
    for k in reversed(range(len(plan.heads))):
        z = plan.heads[k].logits(features.pooled[k])
        take = softmax(z).max(axis=1) >= plan.heads[k].threshold
        exit_index[take] = k
        staged[take] = z.argmax(axis=1)[take]
    return staged_report(plan, exit_index, staged, full_top1, features.labels, features.source)


def staged_report(plan: ExitPlan, exit_index: np.ndarray, staged_top1: np.ndarray,
                  full_top1: np.ndarray, labels: np.ndarray | None,
                  source: str = "") -> StagedReport:
    """Per-exit fractions, agreement and accuracy from where each sample exited.

    Args:
        plan: The plan (for exit names, thresholds and MACs).
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
        expected, plan.total_macs, source)
