"""Builder: plans, calibrates (once, cached), rewrites and bias-corrects one model for the
``quantize`` pass and its fallback's probes (:mod:`.quantize`, :mod:`.search`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxopt.ir import clone_model, node_label
from onnxopt.pass_base import PassContext, PassResult
from onnxopt.passes.quantize.bias_correction import apply_shifts, measure_shifts
from onnxopt.passes.quantize.calibration import calibrate, group_params
from onnxopt.passes.quantize.cpu import int8_pairs_saturate
from onnxopt.passes.quantize.dynamic import (
    DYNAMIC_OPSET,
    dynamic_candidate,
    quantize_dynamic_matmuls,
)
from onnxopt.passes.quantize.placement import Plan, plan_quantization
from onnxopt.passes.quantize.rewrite import Rewritten, apply_plan
from onnxopt.passes.quantize.tensor_stats import TensorStats

if TYPE_CHECKING:
    from onnxopt.passes.quantize.quantize import QuantizeOptions, QuantizePass


class Builder:
    """Plans, calibrates (once, cached), rewrites and bias-corrects one model."""

    def __init__(self, pass_: QuantizePass, ctx: PassContext, float_model: ir.Model,
                 opset: int, per_channel: bool) -> None:
        self.o: QuantizeOptions = pass_.options
        self.ctx = ctx
        self.float_model = float_model
        self.opset = opset
        self.per_channel = per_channel
        self.reduce_range = (int8_pairs_saturate() if self.o.reduce_range is None
                             else self.o.reduce_range)
        self.stats: dict[str, TensorStats] = {}
        self.excl = {"exclude_nodes": set(self.o.exclude_nodes),
                     "exclude_ops": set(self.o.exclude_ops)}
        self.last_corrections: dict[str, float] = {}
        #: Bias shifts per node, measured on the first bias-corrected build and reused.
        self.shifts: dict[str, np.ndarray] | None = None
        #: Whether builds make the MatMuls of :attr:`dynamic_nodes` dynamic int8.
        self.dynamic = False
        #: Whether builds correct the int32 biases (:mod:`.bias_correction`).
        self.bias_correction = bool(self.o.bias_correction)
        self.dynamic_nodes = {
            i for i, n in enumerate(float_model.graph)
            if dynamic_candidate(n) and opset >= DYNAMIC_OPSET
            and n.name not in self.excl["exclude_nodes"] and n.op_type not in self.excl[
                "exclude_ops"]}
        self.last_dynamic = 0

    def model(self, keep_float: set[int]) -> ir.Model:
        """A quantized copy of the float model with ``keep_float`` left float."""
        return self.copy(keep_float)[0]

    def copy(self, keep_float: set[int]) -> tuple[ir.Model, Plan, Rewritten]:
        """:meth:`model` with the plan it was made from and what the rewrite did."""
        copy = clone_model(self.float_model)
        plan, rewritten = self(copy, keep_float, PassResult(False))
        return copy, plan, rewritten

    def __call__(self, model: ir.Model, keep_float: set[int], result: PassResult,
                 ) -> tuple[Plan, Rewritten]:
        dynamic = self.dynamic_nodes if self.dynamic else set()
        nodes = list(model.graph)
        planned = PassResult(False)
        plan = plan_quantization(model.graph, self.opset, planned,
                                 keep_float=keep_float | dynamic, **self.excl)
        labels = {node_label(nodes[i]) for i in dynamic}
        for refusal in planned.refusals:  # a dynamic MatMul is not "kept float"
            if refusal.where not in labels:
                result.refusals.append(refusal)
        self.last_dynamic = 0
        self.last_corrections = {}
        rewritten = self._rewrite(model, plan) if plan.nodes else Rewritten()
        if dynamic:
            self.last_dynamic = quantize_dynamic_matmuls(
                model.graph, [nodes[i] for i in sorted(dynamic)], reduce_range=self.reduce_range)
        return plan, rewritten

    def _rewrite(self, model: ir.Model, plan: Plan) -> Rewritten:
        """Calibrate what ``plan`` needs (once per tensor), write its Q/DQ into ``model`` and
        correct the biases when asked."""
        o, ctx = self.o, self.ctx
        assert ctx.calib is not None
        missing = [n for n in plan.tensors if n not in self.stats]
        if missing:
            bins = o.bins if o.method != "minmax" else 0  # minmax reads no histogram
            self.stats.update(calibrate(
                self.float_model, missing, ctx.calib, bins=bins, batch_size=o.batch_size,
                limit=o.calib_samples, input_shapes=ctx.input_shapes,
                show_progress=ctx.progress))
        params, _ = group_params(plan, self.stats, method=o.method, percentile=o.percentile,
                                 activation_type=o.activations)
        rewritten = apply_plan(model.graph, plan, params, activation_type=o.activations,
                               per_channel=self.per_channel, reduce_range=self.reduce_range,
                               add_bias=self.bias_correction)
        if self.bias_correction:
            if self.shifts is None:  # measured once, on the first bias-corrected build
                self.shifts = measure_shifts(
                    model, rewritten.bias_sites, ctx.calib, batch_size=o.batch_size,
                    limit=o.calib_samples, input_shapes=ctx.input_shapes,
                    show_progress=ctx.progress)
            self.last_corrections = apply_shifts(rewritten.bias_sites, self.shifts)
        return rewritten
