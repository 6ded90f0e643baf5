"""The ``quantize`` pass: int8 QDQ quantization from calibration data, placed for onnxruntime.

Steps, each in its own module:

1. optional cross-layer equalization of the float weights, then activation-range
   equalization (on by default; both :mod:`.equalize`);
2. placement: which nodes and tensors get QuantizeLinear/DequantizeLinear (:mod:`.placement`),
   with each HardSwish split into ``x * HardSigmoid(x)`` so that its product can be int8
   (joined back where it stays float; :mod:`.hard_swish`);
3. calibration: streaming statistics of those tensors and a range per parameter group
   (:mod:`.calibration`, :mod:`.tensor_stats`, :mod:`.ranges`);
4. rewrite: Q/DQ nodes, int8 weights, int32 biases (:mod:`.rewrite`, :mod:`.scheme`);
5. optional bias correction of each layer's expected output shift (:mod:`.bias_correction`);
6. the fallback (on by default): the int8 model is scored against the run's quality floor
   on the calibration samples; below it the elementwise ops, then the most sensitive nodes
   stay float (with bias correction when it scores better), then the MatMuls are tried as
   dynamic int8 (:mod:`.dynamic`) beside static Convs (the most sensitive of them float),
   and last alone, until it clears it, or nothing is quantized (:mod:`.search`,
   :mod:`.fallback`); and the per-node SQNR report.
   A node that stays float is kept where onnxruntime cannot re-fuse it (:mod:`.refusion`);
7. the int8 model timed against the float one on this CPU, and the ``max_latency`` refusal
   (:mod:`.speed`).

The HardSwish split runs once, before everything else; placement, calibration (cached per
tensor: a later probe measures only tensors not seen yet), rewrite and bias correction run in
:class:`.builder.Builder`, once per fallback probe.
The arithmetic of each step is stated at the top of its module.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import onnx
import onnx_ir as ir

from onnxopt.cost import infer_shapes
from onnxopt.errors import UserError
from onnxopt.ir import clone_model, node_label, opset_version, unmatched
from onnxopt.model_io import serialized_size
from onnxopt.opset import OpsetConversionError, convert_opset
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from onnxopt.passes.quantize.builder import Builder
from onnxopt.passes.quantize.equalize import equalize, equalize_activations
from onnxopt.passes.quantize.fallback import tensor_sqnr
from onnxopt.passes.quantize.hard_swish import join_hard_swish, split_hard_swish
from onnxopt.passes.quantize.placement import (
    COMPUTE_OPS,
    PLACEMENT,
    SAME,
    Plan,
)
from onnxopt.passes.quantize.rewrite import Rewritten
from onnxopt.passes.quantize.search import dynamic_note, missed, search
from onnxopt.passes.quantize.speed import time_against_float

logger = logging.getLogger(__name__)

#: The opset that has QuantizeLinear/DequantizeLinear, and the one that gives them ``axis``.
QDQ_OPSET = 10
PER_CHANNEL_OPSET = 13


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of the ``quantize`` pass.

    Attributes:
        method: Range selection: ``minmax``, ``percentile``, ``entropy`` (KL) or ``mse``.
        percentile: Percentile for ``method=percentile``.
        per_channel: Per-output-channel weight scales (False: one scale per weight). They
            need opset 13; an older model is upgraded with onnx's version converter
            (per-tensor weights need 10), and the report says so.
        activations: ``uint8`` (asymmetric) or ``int8`` (symmetric).
        reduce_range: 7-bit weights (``|q| <= 63``), so that onnxruntime's u8*s8 kernels on
            x86 without VNNI cannot saturate (:mod:`.cpu`). None: 7-bit when the CPU running
            the pass is such a CPU, 8-bit otherwise; the pass validates on this CPU,
            so give ``reduce_range=true`` when building for a non-VNNI x86 target elsewhere.
        equalize: Cross-layer equalization of the weights before calibration.
        equalize_activations: Activation-range equalization before calibration (on by
            default): between two Conv/Gemm joined only by positively homogeneous ops
            (Relu, pooling, ...), each channel is rescaled (exactly) so that the
            calibration ranges of the tensor the second one reads become about equal, for
            its one per-tensor activation scale (:func:`.equalize.equalize_activations`).
            Needs per-channel weights.
        bias_correction: Correct each layer's expected output shift after quantization
            (one more calibration run of the int8 model). None: only in the fallback, when
            the all-int8 model misses the floor: it is tried on that model and kept for the
            rest of the search when it scores better. True: always. False: never.
        fallback: Score the int8 model on the calibration samples against the quality
            floor the run applies (plus a margin); when it misses, keep the elementwise ops
            float (int8 only into Conv/Gemm/MatMul), then its most sensitive compute nodes,
            until it clears it; when it cannot, quantize nothing (:mod:`.fallback`).
        target: The top-1 (or per-sequence argmax path) agreement the fallback aims for,
            instead of the floor's plus its margin.
        exclude_nodes: Node names that stay float (``;``-separated on the command line).
            Their output gets no QuantizeLinear, so onnxruntime cannot re-fuse them into an
            integer kernel, and the quantized nodes reading that output stay float too
            (:mod:`.refusion`).
        exclude_ops: Op types that stay float (the same). A name in ``exclude_nodes``
            that is no node of the model, or an op type that is neither an ONNX op nor
            in the model, is an error (a misspelling would otherwise do nothing).
        calib_samples: Cap on calibration samples (None = all).
        batch_size: Calibration batch size when the batch axis is dynamic.
        bins: Histogram bins per tensor.
        dynamic_matmul: MatMuls with a constant weight get int8 with their activation's
            range measured on each input at run time (DynamicQuantizeLinear + MatMulInteger,
            fused by onnxruntime into DynamicQuantizeMatMul; :mod:`.dynamic`) instead of a
            calibrated QuantizeLinear. None: only in the fallback, when no static int8 model
            meets the floor: first beside static Conv/ConvTranspose/Gemm (the most sensitive
            of them float), last with every other node float. True: always. False: never.
        max_float_nodes: Most nodes the fallback may keep float (None: half of the
            candidates, at least 8; the search would otherwise end at a model that is
            mostly float).
        max_probes: Most candidate models the fallback builds and scores (the model with
            only compute ops int8, then ``k = 1, 2, 4, ...`` nodes float, then a bisection
            between the last two ``k``; on a model with dynamic MatMul candidates, one probe
            is kept for the last one and half of the rest for the static Convs beside
            dynamic MatMuls). Once a model meets the targets, up to as many more probes
            make it faster (elementwise ops and float nodes back to int8 while the targets
            hold).
        report_sqnr: Measure the per-node SQNR for the report (one more calibration run).
        sqnr_samples: Samples for the per-node SQNR (report and the fallback's ranking).
        score_samples: Samples the fallback scores the int8 model on.
        speed_check: Time the int8 model against the float one on this CPU (batch 1, one
            thread, side by side: a few seconds, plus four session builds, about 20 s for a
            500 MB model) and say so in the report when it is slower (:mod:`.speed`).
        max_latency: Refuse, and hand back the float model, when the int8 model runs
            slower than this multiple of the float model's latency beyond the timing
            noise (1.0: int8 must not be slower). None: only report.
    """

    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = option(99.999, within="(0, 100]")
    per_channel: bool = True
    activations: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool | None = None
    equalize: bool = False
    equalize_activations: bool = True
    bias_correction: bool | None = None
    fallback: bool = True
    target: float | None = option(None, within="[0, 1]")
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    dynamic_matmul: bool | None = None
    calib_samples: int | None = option(None, within="[1, inf)")
    batch_size: int = option(16, within="[1, inf)")
    bins: int = option(2048, within="[2, inf)")
    max_float_nodes: int | None = option(None, within="[0, inf)")
    max_probes: int = option(20, within="[0, inf)")
    report_sqnr: bool = True
    sqnr_samples: int = option(8, within="[1, inf)")
    score_samples: int = option(64, within="[1, inf)")
    speed_check: bool = True
    max_latency: float | None = option(None, within="(0, inf)")


@register_pass
class QuantizePass(Pass):
    """Inserts int8 Q/DQ pairs from calibration statistics so onnxruntime runs integer kernels."""

    name = "quantize"
    description = "int8 QDQ quantization from calibration data (onnxruntime integer kernels)"
    Options = QuantizeOptions
    exact = False
    needs_data = True
    tolerance = Tolerance(rtol=0.1, atol=0.05)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Quantize ``model`` in place."""
        o: QuantizeOptions = self.options
        result = PassResult(modified=False, exact=False)
        _check_exclusions(model.graph, o)
        if ctx.calib is None:
            result.refuse("model", "no calibration data")
            return result
        size_before = serialized_size(model)
        stats: dict[str, object] = {}
        found = opset_version(model)
        upgrade = _upgrade_opset(model, o.per_channel, result)
        if upgrade is None:
            return result
        opset, per_channel, why = upgrade
        notes = []
        if opset != found:
            stats["opset_upgraded"] = {"from": found, "to": opset}
            notes.append(f"opset {found} -> {opset} by onnx's version converter ({why})")
        if any(v.type is None for node in model.graph for v in node.outputs):
            infer_shapes(model)  # in place; the manager has usually done it already
        if o.equalize:
            stats["equalized_pairs"] = equalize(model.graph, result)
        before_equalization = None
        if o.equalize_activations and per_channel:
            before_equalization = clone_model(model)  # restored when nothing is quantized
            stats["activation_equalized_pairs"] = equalize_activations(
                model, PassResult(False) if o.equalize else result, ctx.calib,
                batch_size=o.batch_size, limit=o.calib_samples, input_shapes=ctx.input_shapes,
                show_progress=ctx.progress)
        elif o.equalize_activations:
            result.refuse("model", "equalize_activations needs per-channel weights: not run")
        # int8 products instead of float HardSwish; the float ones are joined back below
        split = [] if "HardSwish" in o.exclude_ops else split_hard_swish(model.graph)
        float_model = clone_model(model)
        build = Builder(self, ctx, float_model, opset, per_channel)
        keep_float: set[int] = set()
        build.dynamic = bool(o.dynamic_matmul)
        def unquantized(note: str | None) -> PassResult:
            """Nothing quantized: only the opset upgrade and the weight equalization stay."""
            if note:
                notes.append(note)
            if stats.pop("activation_equalized_pairs", 0) and before_equalization is not None:
                model.graph = before_equalization.graph  # its rescaling served int8 only
            result.stats = stats
            result.modified = bool(stats.get("equalized_pairs")) or opset != found
            result.summary = "; ".join(notes) or None
            return result

        if o.fallback:
            chosen = search(build, ctx, o, stats)
            if chosen is None:
                join_hard_swish(model.graph, split)
                result.refuse("model", missed(stats["fallback"]))
                return unquantized("not quantized: int8 stays below the quality floor")
            keep_float = chosen
            if o.bias_correction is None and build.bias_correction:
                notes.append("bias correction on (the fallback's int8 model scored better "
                             "with it)")
        plan, rewritten = build(model, keep_float, result)
        joined = join_hard_swish(model.graph, split)
        speed = (time_against_float(float_model, model, ctx)
                 if (plan.nodes or build.last_dynamic)
                 and (o.speed_check or o.max_latency is not None) else None)
        if speed is not None:
            stats["latency_vs_float"] = speed.to_dict()
            if o.max_latency is not None and speed.over(o.max_latency):
                model.graph = float_model.graph  # the float model, as the search left it
                join_hard_swish(model.graph, split)
                result.refuse("model", f"{speed.describe()}, over max_latency="
                                       f"{o.max_latency:g}; nothing quantized")
                return unquantized("not quantized: slower than max_latency")
        if len(split) > joined:
            stats["hard_swish_split"] = len(split) - joined
        if build.dynamic:
            stats["dynamic_matmul"] = build.last_dynamic
            notes.append(f"{build.last_dynamic} MatMul dynamic int8 (activation range per "
                         "input)")
            why = dynamic_note(stats.get("fallback"))
            if why:
                notes.append(why)
        if not plan.nodes and not build.last_dynamic:
            stats["quantized"] = 0
            return unquantized(None)
        if speed is not None and speed.over(1.0):
            notes.append(f"{speed.describe()}: the float model is faster here")
        result.modified = True
        stats.update(_summary(plan, rewritten))
        stats["reduce_range"] = build.reduce_range
        if o.reduce_range is None and build.reduce_range:
            notes.append("7-bit weights (reduce_range): this x86 CPU has no VNNI, so 8-bit "
                         "u8*s8 products would saturate in onnxruntime")
        result.summary = "; ".join(notes) or None
        dynamic = build.dynamic_nodes if build.dynamic else set()
        stats["kept_float"] = [node_label(n) for i, n in enumerate(float_model.graph)
                               if i in keep_float and n.op_type in PLACEMENT
                               and i not in dynamic]
        stats["bias_corrections"] = build.last_corrections
        if o.report_sqnr:
            original = {new: old for old, new in rewritten.names.items()}
            wanted = {original.get(p.output.name, p.output.name): p for p in plan.nodes
                      if p.output is not None and p.rule.output != SAME}
            names = {k: rewritten.names.get(k, k) for k in wanted}
            sqnr = tensor_sqnr(float_model, model, names, ctx.calib, limit=o.sqnr_samples,
                               batch_size=o.batch_size, input_shapes=ctx.input_shapes)
            stats["node_sqnr_db"] = {node_label(wanted[k].node): round(v, 2)
                                     for k, v in sorted(sqnr.items(), key=lambda kv: kv[1])}
        stats["size_bytes"] = {"before": size_before, "after": serialized_size(model)}
        result.stats = stats
        return result


def _upgrade_opset(model: ir.Model, per_channel: bool, result: PassResult,
                   ) -> tuple[int, bool, str] | None:
    """Bring the model to the opset quantization needs, with onnx's version converter.

    Per-channel weight scales need opset 13 (``axis`` on DequantizeLinear), QuantizeLinear
    itself 10. When the conversion to 13 fails, weights are quantized per tensor instead
    (at the model's opset, or 10); the refusal names the op that blocked it.

    Returns:
        The opset, whether weights are per channel and why the opset was raised (if it
        was), or None when the model cannot get QuantizeLinear (refusal recorded).
    """
    opset = opset_version(model)
    if opset == 0:
        result.refuse("model", "no default-domain opset is imported: nothing to quantize")
        return None
    if per_channel and opset < PER_CHANNEL_OPSET:
        try:
            convert_opset(model, PER_CHANNEL_OPSET)
            return PER_CHANNEL_OPSET, True, "per-channel weight scales need 13"
        except OpsetConversionError as exc:
            result.refuse("model", f"per-channel weights need opset 13, {exc}; using "
                                   "per-tensor weights")
    if opset >= QDQ_OPSET:
        return opset, per_channel and opset >= PER_CHANNEL_OPSET, ""
    try:
        convert_opset(model, QDQ_OPSET)
    except OpsetConversionError as exc:
        result.refuse("model", f"QuantizeLinear needs opset 10, {exc}")
        return None
    return QDQ_OPSET, False, "QuantizeLinear needs 10"


def _summary(plan: Plan, rewritten: Rewritten) -> dict[str, object]:
    ops = Counter(p.node.op_type for p in plan.nodes)
    return {
        "quantized": len(plan.nodes),
        "quantized_ops": dict(sorted(ops.items())),
        "compute_nodes": sum(ops[op] for op in COMPUTE_OPS),
        "absorbed_activations": sum(1 for p in plan.nodes if p.absorbed is not None),
        "parameter_groups": len(plan.groups()),
        "inserted": dict(sorted(rewritten.counts.items())),
        "float_constants_removed": rewritten.float_removed,
    }


def _check_exclusions(graph: ir.Graph, o: QuantizeOptions) -> None:
    """A misspelt ``exclude_nodes`` name or ``exclude_ops`` type is an error, not a no-op."""
    missing = unmatched(graph, o.exclude_nodes)
    if missing:
        raise UserError(f"quantize(exclude_nodes=...): {', '.join(map(repr, missing))} names "
                        "no node of the model")
    present = {node.op_type for node in graph}
    unknown = [op for op in o.exclude_ops if op not in present and not onnx.defs.has(op)]
    if unknown:
        raise UserError(f"quantize(exclude_ops=...): {', '.join(map(repr, unknown))} is no "
                        "ONNX op type and no op of the model")
