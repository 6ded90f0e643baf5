"""Channel granularity of blocked kernels, measured: where a one-node cost curve steps.

Blocked kernels (NCHWc convolutions, packed GEMMs) cost the same over a range of widths and
jump past each multiple of their block, or fall back to a slower kernel off the multiples. A
latency budget that ignores this keeps widths that cost as much as the next multiple up
(:mod:`.latency_slices` snaps plans to the step found here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnxopt.passes.prune.latency import NodeSpec
    from onnxopt.passes.prune.latency_cache import LatencyMeter

STEPS = (16, 8, 4, 2)
"""Candidate channel granularities of blocked kernels, tried largest first."""

STEP_SCAN = 40
"""Widths below the full width scanned per op kind to find its granularity."""


def detect_step(widths: Sequence[int], seconds: Sequence[float], tolerance: float = 0.03) -> int:
    """The channel granularity at which a measured cost curve steps (1 when it is smooth).

    Blocked kernels either pad a width up to the next multiple of the block (flat, then a
    jump just past each multiple) or fall back to a slower kernel off the multiples (a dip
    at each multiple). Both make the rise from a multiple ``k`` to ``k + 1`` larger than the
    rise from an odd width to the next (the smooth part of the curve). The granularity is
    the smallest candidate whose multiples (two or more in the scan) *all* rise more, by
    ``tolerance`` of the full-width time, taking the lower quartile of their rises so that
    a step of 8 is not mistaken for one of 4 (half of whose multiples rise).
    """
    order = np.argsort(widths)
    k = np.asarray(widths)[order]
    t = np.asarray(seconds, dtype=np.float64)[order]
    rise = {int(a): float(tb - ta) for a, b, ta, tb in zip(k[:-1], k[1:], t[:-1], t[1:],
                                                            strict=True) if b == a + 1}
    smooth = [r for a, r in rise.items() if a % 2]
    if len(rise) < 4 or not smooth:
        return 1
    base, scale = float(np.median(smooth)), float(t[-1])
    for step in sorted(STEPS):
        at = [r for a, r in rise.items() if a % step == 0]
        if len(at) >= 2 and float(np.percentile(at, 25)) - base > tolerance * scale:
            return step
    return 1


def _kind(spec: NodeSpec) -> tuple[object, ...]:
    attrs = dict(spec.signature["attrs"])  # type: ignore[arg-type]
    return (spec.node.op_type, attrs.get("kernel_shape"), attrs.get("group"),
            attrs.get("strides"))


def _role(spec: NodeSpec, factor: int) -> str:
    """``in`` when the factor scales the node's first (data) input, else ``out``."""
    return "in" if spec.inputs and factor in spec.inputs[0][4].values() else "out"


def measured_steps(specs: Sequence[NodeSpec], meter: LatencyMeter) -> dict[int, int]:
    """Group index -> channel granularity measured on the kinds of op it feeds or leaves.

    Per op kind (op type, kernel, group, strides) of a weighted op, the widest node is timed
    at every width in the top :data:`STEP_SCAN` of each of its factors (the other at full
    width); :func:`detect_step` finds the step. A group takes the largest step of its nodes.
    """
    widest: dict[tuple[object, ...], NodeSpec] = {}
    for spec in specs:
        if spec.node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        kind = _kind(spec)
        if kind not in widest or sum(spec.sizes) > sum(widest[kind].sizes):
            widest[kind] = spec
    requests, scans = [], []
    for spec in widest.values():
        for f, size in enumerate(spec.sizes):
            widths = list(range(max(1, size - STEP_SCAN), size + 1))
            points = [tuple(w if i == f else s for i, s in enumerate(spec.sizes)) for w in widths]
            requests.append((spec, points))
            scans.append((spec, f, widths, points))
    steps: dict[tuple[object, ...], int] = {}
    for (spec, f, widths, points), found in zip(scans, meter.times(requests), strict=True):
        steps[(*_kind(spec), _role(spec, f))] = detect_step(widths, [found[p] for p in points])
    by_group: dict[int, int] = {}
    for spec in specs:
        for f, g in enumerate(spec.factors):
            step = steps.get((*_kind(spec), _role(spec, f)), 1)
            by_group[g] = max(by_group.get(g, 1), step)
    return by_group

