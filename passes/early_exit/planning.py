"""Planning exits on calibration data: fit heads, keep the exits worth their cost, set thresholds.

The calibration samples are split at random (``seed``) into two parts that never mix:

1. **Head samples** (``head_share`` of them; by default half, but fewer when the threshold
   samples would otherwise be too few for the promise: see :func:`threshold_count`). At
   every candidate cut a linear head (:mod:`.heads`) is fitted against the full model's
   logits (or the labels), and its temperature on out-of-fold logits. Still on these samples
   (out-of-fold), every subset of the candidates is scored by its expected cost per sample at
   the level the guarantee would pick: MACs up to the exit, every head run so far, and
   ``exit_overhead`` of the model's MACs per decision (the runtime cost of an extra small op
   chain). The cheapest subset is kept, so an exit that saves less than its head and
   decision cost is dropped.
2. **Threshold samples** (the rest). The shared level of the chosen exits is picked on them
   with the requested guarantee (:mod:`.guarantee`). Since nothing was fitted on them, they
   are exchangeable with new samples and the promise holds on unseen data.

Agreement needs no labels, so unlabelled samples are as good as labelled ones here: more of
them allow a lower level (more exits) for the same promise. With too few, fewer or no exits
are kept, and the message says how many the promise needs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.errors import DataError, UserError
from onnxopt.passes.early_exit.cuts import CutPoint
from onnxopt.passes.early_exit.exits import (
    ExitHead,
    ExitPlan,
    ExitPlanError,
    Features,
    collect_features,
    staged_report,
)
from onnxopt.passes.early_exit.guarantee import (
    GRID,
    Guarantee,
    choose_level,
    crc_level,
    exit_index,
    samples_needed,
)
from onnxopt.passes.early_exit.heads import (
    HeadKind,
    PoolKind,
    fit_head,
    fit_temperature,
    head_macs,
    margin,
    pooling,
    softmax,
)

logger = logging.getLogger(__name__)

FitTarget = Literal["logits", "labels"]

#: Exhaustive subset search up to this many candidates; greedy elimination beyond.
_EXHAUSTIVE = 10


def plan_exits(model: ir.Model, calib: FeedSource, cuts: Sequence[CutPoint], *,
               target: float = 0.99, confidence: float | None = None,
               head: HeadKind = "ridge", fit_to: FitTarget = "logits", pool_kind: PoolKind = "grid",
               l2: float = 1e-3, folds: int = 5, seed: int = 0,
               head_share: float | None = None, exit_overhead: float = 0.01,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None,
               batch_size: int = 64, limit: int | None = None) -> ExitPlan:
    """Run the model over ``calib`` and plan exits at (a subset of) ``cuts``.

    See :func:`plan_from_features` for the arguments and errors.
    """
    _check(target, confidence, head_share)
    features = collect_features(model, calib, cuts, pool_kind=pool_kind,
                                input_shapes=input_shapes, batch_size=batch_size, limit=limit)
    inputs = [v.name or "" for v in model.graph.inputs if not v.is_initializer()]
    return plan_from_features(features, cuts, inputs, model.graph.outputs[0].name or "",
                              target=target, confidence=confidence, head=head, fit_to=fit_to,
                              pool_kind=pool_kind, l2=l2, folds=folds, seed=seed,
                              head_share=head_share, exit_overhead=exit_overhead)


def _check(target: float, confidence: float | None, head_share: float | None) -> None:
    if not 0.0 < target <= 1.0:
        raise UserError(f"target must be in (0, 1], got {target}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise UserError(f"confidence must be in (0, 1), got {confidence}")
    if head_share is not None and not 0.0 < head_share < 1.0:
        raise UserError(f"head_share must be in (0, 1), got {head_share}")


def threshold_count(n: int, head_share: float | None, needed: int) -> int:
    """How many of ``n`` calibration samples set the thresholds (the rest fit the heads).

    With ``head_share`` given, ``n - round(head_share * n)``. By default (None) half of them,
    raised towards 1.25x the ``needed`` samples of the promise while at least a quarter of
    the samples stay for the heads. At least 1 sample goes to each side.
    """
    if head_share is not None:
        count = n - int(round(head_share * n))
    else:
        count = max(n - n // 2, min(n - n // 4, needed + needed // 4))
    return min(max(count, 1), n - 2) if n > 2 else max(n - 1, 0)


def samples_for(needed: int, head_share: float | None) -> int:
    """Fewest calibration samples whose threshold part reaches ``needed``."""
    n = needed + 2
    while threshold_count(n, head_share, needed) < needed:
        n += 1
    return n


def plan_from_features(features: Features, cuts: Sequence[CutPoint], inputs: list[str],
                       output: str, *, target: float = 0.99, confidence: float | None = None,
                       head: HeadKind = "ridge", fit_to: FitTarget = "logits",
                       pool_kind: PoolKind = "grid", l2: float = 1e-3, folds: int = 5,
                       seed: int = 0, head_share: float | None = None,
                       exit_overhead: float = 0.01) -> ExitPlan:
    """Fit heads, choose the exits worth their cost and their shared level.

    Args:
        features: Pooled features at every candidate cut, with the full model's outputs.
        cuts: The candidate cut points.
        inputs: Model input names (for the plan).
        output: The classifier output name.
        target: Promised agreement with the full model on new samples.
        confidence: None promises ``target`` in expectation (conformal risk control);
            a probability promises it with that probability over the calibration draw
            (Learn-then-Test).
        head: ``ridge`` or ``logistic`` heads.
        fit_to: Fit the heads to the full model's ``logits`` or to the ``labels``.
        pool_kind: ``grid`` (2x2 mean pool where the cut allows it) or ``avg``.
        l2: Head regularisation.
        folds: Folds for the out-of-fold logits (temperatures and the choice of exits).
        seed: Seed of the split into head and threshold samples and of the folds.
        head_share: Share of the samples that fit the heads; the rest set the level
            (None: see :func:`threshold_count`).
        exit_overhead: Per-exit decision cost as a share of the model's MACs.

    Raises:
        ExitPlanError: No exit can be allowed under the promise (the message says how many
            samples the promise needs, when that is the reason).
        DataError: Labels are needed but missing.
    """
    _check(target, confidence, head_share)
    n = len(features)
    order = np.random.default_rng(seed).permutation(n)
    needed = samples_needed(target, confidence)
    n_heads = n - threshold_count(n, head_share, needed)
    fit, hold = np.sort(order[:n_heads]), np.sort(order[n_heads:])
    full_top1 = features.logits.argmax(axis=1)
    y = _targets(features, head, fit_to)
    classes = features.logits.shape[1]
    total = cuts[0].total_macs if cuts else 0
    candidates: list[ExitHead] = []
    oof_scores, oof_agrees = [], []
    for cut in cuts:
        x = features.pooled[cut.name]
        oof = _out_of_fold(x[fit], y[fit], head, l2, folds, seed)
        temperature = fit_temperature(oof, full_top1[fit])
        weight, bias = fit_head(x[fit], y[fit], head, l2)
        kind = pooling(cut.shape, pool_kind)
        window = tuple(int(d) // 2 for d in (cut.shape or ())[2:]) if kind == "grid" else ()
        candidates.append(ExitHead(cut.name, weight, bias, 0.0, cut.macs_before,
                                   head_macs(cut.shape, classes, kind), len(cut.shape or ()),
                                   kind, temperature, window))
        oof_scores.append(margin(oof).astype(np.float64) / temperature)
        oof_agrees.append(oof.argmax(axis=1) == full_top1[fit])
    keep = _select(np.array(oof_scores).T, np.array(oof_agrees).T, candidates, total,
                   target, exit_overhead * total)
    heads = [candidates[k] for k in keep]
    dropped = {c.cut: "saves less than its head and decision cost" for k, c in
               enumerate(candidates) if k not in keep}
    hold_x = [features.pooled[h.cut][hold] for h in heads]
    scores = np.array([h.score(x) for h, x in zip(heads, hold_x, strict=True)]).T.reshape(
        len(hold), len(heads))
    agrees = np.array([h.logits(x).argmax(axis=1) == full_top1[hold]
                       for h, x in zip(heads, hold_x, strict=True)]).T.reshape(len(hold),
                                                                               len(heads))
    level, bound = choose_level(scores, agrees, target, confidence)
    guarantee = Guarantee(target, confidence, len(hold), len(fit), level, bound, needed)
    if level is None:
        reason = guarantee.shortfall(samples_for(needed, head_share)) or (
            f"no level of the exits at {', '.join(h.cut for h in heads)} keeps agreement "
            f"{target:g} {guarantee.kind} on the {len(hold)} threshold samples")
        raise ExitPlanError(f"no exit kept: {reason}")
    for h in heads:
        h.threshold = float(np.float32(GRID[level] * h.temperature))
    plan = ExitPlan(inputs, output, classes, total, target, heads, dropped,
                    guarantee=guarantee)
    index = exit_index(scores, GRID[level:level + 1])[:, 0]
    staged = full_top1[hold].copy()
    for k in reversed(range(len(heads))):
        there = index == k
        staged[there] = heads[k].logits(hold_x[k][there]).argmax(axis=1)
    labels = None if features.labels is None else features.labels[hold]
    plan.calib_report = staged_report(plan, index, staged, full_top1[hold], labels,
                                      f"{features.source} (held-out threshold samples)")
    return plan


def _select(scores: np.ndarray, agrees: np.ndarray, candidates: Sequence[ExitHead], total: int,
            target: float, overhead: float) -> list[int]:
    """Indices of the candidate subset with the least expected cost (out-of-fold estimate).

    Each subset gets the in-expectation level on the out-of-fold scores (a proxy of the level
    the threshold samples will give); a subset with no allowed level costs the full model.
    All candidates are kept when no subset has one (the threshold samples decide then).
    """
    k_all = len(candidates)

    def cost(subset: Sequence[int]) -> float:
        if not subset:
            return float(total)
        level, _ = crc_level(scores[:, subset], agrees[:, subset], target)
        if level is None:
            return np.inf
        macs, heads = [], 0.0
        for k in subset:
            heads += candidates[k].macs + overhead
            macs.append(candidates[k].macs_before + heads)
        macs.append(total + heads)
        where = exit_index(scores[:, subset], GRID[level:level + 1])[:, 0]
        return float(np.mean(np.asarray(macs)[where]))

    if k_all <= _EXHAUSTIVE:
        subsets = [list(s) for r in range(1, k_all + 1)
                   for s in itertools.combinations(range(k_all), r)]
        costs = [cost(s) for s in subsets]
        best = int(np.argmin(costs))
        return subsets[best] if np.isfinite(costs[best]) else list(range(k_all))
    keep = list(range(k_all))
    current = cost(keep)
    while len(keep) > 1:
        trials = [(cost([k for k in keep if k != drop]), drop) for drop in keep]
        value, drop = min(trials)
        if value >= current:
            break
        keep.remove(drop)
        current = value
    return keep


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
