"""Calibration: statistics of the planned tensors and one set of parameters per tensor group.

Each tensor's clipping range comes from its own statistics with the chosen method
(:data:`onnxopt.passes.quantize.ranges.RANGE_METHODS`); a group of tensors that must share
parameters (data movement, Concat) takes the union of its members' ranges, so no member is
clipped harder than its method asked for. With int8 activations a range that is never negative
stays one-sided (zero point -128) and any other range is made symmetric.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.passes.quantize.placement import Plan
from onnxopt.passes.quantize.ranges import select_range
from onnxopt.passes.quantize.scheme import QuantParams, activation_params
from onnxopt.passes.quantize.tensor_stats import TensorStats, collect_activation_stats

logger = logging.getLogger(__name__)


def calibrate(model: ir.Model, names: list[str], source: FeedSource, *, bins: int,
              batch_size: int, limit: int | None,
              input_shapes: Mapping[str, tuple[int, ...]] | None,
              show_progress: bool) -> dict[str, TensorStats]:
    """Statistics of the tensors ``names`` of ``model`` over the calibration feeds."""
    return collect_activation_stats(model, source, names, bins=bins, batch_size=batch_size,
                                    limit=limit, input_shapes=input_shapes,
                                    show_progress=show_progress)


def group_params(plan: Plan, stats: Mapping[str, TensorStats], *, method: str,
                 percentile: float, activation_type: str,
                 ) -> tuple[dict[str, QuantParams], dict[str, tuple[float, float]]]:
    """Parameters per group representative, and the chosen range per tensor."""
    ranges: dict[str, tuple[float, float]] = {}
    params: dict[str, QuantParams] = {}
    for group, members in plan.groups().items():
        lo = hi = 0.0
        for name in members:
            s = stats[name]
            symmetric = activation_type == "int8" and s.min < 0
            ranges[name] = select_range(s, method, symmetric=symmetric, percentile=percentile)
            lo, hi = min(lo, ranges[name][0]), max(hi, ranges[name][1])
        if activation_type == "int8" and lo < 0:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        params[group] = activation_params(lo, hi, activation_type)
    logger.debug("parameters for %d groups of %d tensors", len(params), len(ranges))
    return params, ranges
