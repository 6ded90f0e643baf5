"""The fallback's search: which nodes stay float (or which MatMuls go dynamic) to meet the floor.

Stages, each probe one build and one scoring run on the calibration samples
(:mod:`.fallback` has the scores, the ranking and the doubling/bisection):

1. the all-int8 model; when it misses the targets, and ``bias_correction`` is left to the
   search (None), the all-int8 model with bias correction (:mod:`.bias_correction`),
   which every later probe keeps when it scored better;
2. int8 only into the compute ops (Conv, ConvTranspose, Gemm, MatMul), the elementwise ops,
   pools and activations between them float;
3. the ``k`` most sensitive nodes float as well, ``k`` by doubling then bisection, up to
   ``max_float_nodes`` (default: half of the candidates, at least 8); then, with up to
   ``max_probes`` more probes, each of those float nodes that costs MACs, costliest first,
   goes back to int8 if the targets are still met without it (:func:`_trim`): the
   ranking's prefix holds nodes the targets do not need, and the costly ones are where int8
   saves the most time (before that, when stage 2's model was the base, one probe with the
   elementwise ops back in int8 around the float nodes);
4. the MatMuls with a constant weight int8 with per-input (dynamic) ranges (:mod:`.dynamic`)
   and the other weighted compute ops (Conv, ConvTranspose, Gemm) static int8, every other
   node float; then the ``k`` most sensitive of those static nodes float as well, ``k`` as
   in 3 (its own share of the probes: half of those left after the last probe);
5. every static node float and only the MatMuls dynamic int8.

Stages 4 and 5 run unless ``dynamic_matmul=false`` or the model has no MatMul with a
constant weight.

The first probe that meets the targets is the answer (after stage 3, made faster by the
steps above; stages 4 and 5 take nothing back); when none does, nothing is quantized.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxopt.cost import node_macs
from onnxopt.errors import UserError
from onnxopt.ir import node_label
from onnxopt.pass_base import PassContext
from onnxopt.passes.quantize.fallback import (
    EvalData,
    Score,
    Targets,
    choose_float_nodes,
    rank_by_added_error,
    reference,
    score,
    tensor_sqnr,
)
from onnxopt.passes.quantize.placement import COMPUTE_OPS, SAME
from onnxopt.shapes import concrete_shapes, resolve_input_shapes

if TYPE_CHECKING:
    from onnxopt.passes.quantize.builder import Builder
    from onnxopt.passes.quantize.placement import Plan
    from onnxopt.passes.quantize.quantize import QuantizeOptions
    from onnxopt.passes.quantize.rewrite import Rewritten

logger = logging.getLogger(__name__)

#: Fewest nodes the fallback may keep float by default (more on models with 16+ candidates).
MIN_FLOAT_CAP = 8
#: Compute ops that stay static int8 beside the dynamic MatMuls in stage 4.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: The trace key of stage 4.
MIXED = "dynamic_matmul_stage"


def search(build: Builder, ctx: PassContext, o: QuantizeOptions,
           stats: dict[str, object]) -> set[int] | None:
    """Nodes to keep float so that the result meets the quality floor (:mod:`.fallback`).

    Returns:
        Graph-order indices to keep float (empty when the all-int8 model meets the
        targets), or None when no probe met them.
    """
    assert ctx.calib is not None
    shapes = ctx.input_shapes
    ref = reference(build.float_model, ctx.calib, limit=o.score_samples,
                    batch_size=o.batch_size, input_shapes=shapes)
    targets = Targets.from_floor(ctx.quality_floor, o.target)
    model, plan, rewritten = build.copy(set())
    base = score(model, ref)
    head: dict[str, object] = {"score_all_quantized": base.to_dict(),
                               "targets": targets.to_dict()}
    stats["fallback"] = head
    if base.meets(targets) or not plan.nodes:
        return set()
    probes = o.max_probes
    if o.bias_correction is None and probes > 1 and any(
            p.weight is not None and p.rule.bias is not None for p in plan.nodes):
        # stage 1b: each layer's mean output shift removed (one more calibration run)
        probes -= 1
        build.bias_correction = True
        value, trial = _probe(build, ref, set(), head, "score_bias_corrected",
                              "all int8 with bias correction")
        if value.meets(targets):
            return _met(stats, head, value, set())
        if value.rank_key() > base.rank_key():
            base, (model, plan, rewritten) = value, trial
        else:
            build.bias_correction = False
    fixed: set[int] = set()
    # every node, not only the planned ones: with all of them float, others become plannable
    every = set(range(len(list(build.float_model.graph))))
    # the last probe, kept in reserve: only the MatMuls int8, dynamically
    last = o.dynamic_matmul is not False and bool(build.dynamic_nodes)
    probes -= int(last)
    # and the probes of stage 4: static weighted compute ops beside the dynamic MatMuls
    mixed_fixed = every - {i for i, n in enumerate(build.float_model.graph)
                           if n.op_type in WEIGHTED_OPS}
    mixed_probes = probes // 2 if last and mixed_fixed != every else 0
    probes -= mixed_probes
    others = {p.index for p in plan.nodes if p.node.op_type not in COMPUTE_OPS}
    if others and probes > 0 and any(p.node.op_type in COMPUTE_OPS for p in plan.nodes):
        # stage 2: int8 only into the compute ops, every requantization between them gone;
        # the node search below starts from whichever of the two scored better
        probes -= 1
        value, trial = _probe(build, ref, others, head, "score_compute_only",
                              "only compute ops int8")
        if value.meets(targets):
            return _met(stats, head, value, others)
        if value.rank_key() > base.rank_key():
            fixed, base, (model, plan, rewritten) = others, value, trial
    # stage 3: the most sensitive compute nodes float (every planned node when stage 2 lost)
    order = _ranking(build, ctx, o, model, plan, rewritten)
    cap = _float_cap(o, order)
    chosen, trace = choose_float_nodes(order, lambda kept: build.model(fixed | kept), ref,
                                       targets, base, cap, probes)
    trace = {**trace, **head, "elementwise_float": len(fixed)}  # head: the all-int8 score
    stats["fallback"] = trace
    if chosen is not None:
        left = o.max_probes  # the steps for speed have a budget of their own
        if fixed and left > 0:
            # the elementwise ops back in int8 around the nodes now float: the compute-only
            # base may have won by a little at the start, and float elementwise ops cost
            # a conversion on each side
            left -= 1
            value, _ = _probe(build, ref, chosen, trace, "score_elementwise_back",
                              "elementwise ops back to int8")
            if value.meets(targets):
                fixed, trace["elementwise_float"] = set(), 0
                trace["best"] = {"float_nodes": len(chosen), **value.to_dict()}
        return fixed | _trim(build, ctx, ref, targets, fixed, chosen, left, trace)
    if mixed_probes > 0:
        chosen = _mixed(build, ctx, o, ref, targets, mixed_fixed, mixed_probes, trace)
        if chosen is not None:
            trace["reached"] = True
            return chosen
    if last and o.max_probes > 0:
        # stage 5: every static node float, the MatMuls int8 with per-input ranges
        dynamic_before, build.dynamic = build.dynamic, True
        value = score(build.model(every), ref)
        trace["score_dynamic_matmul_only"] = value.to_dict()
        logger.info("fallback: only the MatMuls int8, dynamic -> %s", value)
        if value.meets(targets):
            trace["reached"] = True
            return every
        build.dynamic = dynamic_before
    return None


def _probe(build: Builder, ref: EvalData, keep_float: set[int], trace: dict[str, object],
           key: str, what: str) -> tuple[Score, tuple[ir.Model, Plan, Rewritten]]:
    """One model built with ``keep_float`` float and scored; its score goes to ``trace[key]``.

    Returns:
        The score, and the model with its plan and rewrite (to search on from it).
    """
    trial = build.copy(keep_float)
    value = score(trial[0], ref)
    trace[key] = value.to_dict()
    logger.info("fallback: %s -> %s", what, value)
    return value, trial


def _met(stats: dict[str, object], head: dict[str, object], value: Score,
         keep_float: set[int]) -> set[int]:
    """``keep_float``, with the trace of a stage before the node search that met the
    targets."""
    stats["fallback"] = {**head, "best": {"float_nodes": 0, **value.to_dict()}, "reached": True}
    return keep_float


def _trim(build: Builder, ctx: PassContext, ref: EvalData, targets: Targets, fixed: set[int],
          chosen: set[int], probes: int, trace: dict[str, object]) -> set[int]:
    """``chosen`` without the float nodes the targets do not need, costliest first.

    Each node of ``chosen`` with MACs (at the data's shapes) is tried back in int8, one
    probe each, in order of MACs, while ``probes`` last; it stays int8 when the model still
    meets the targets. The trace gets ``trimmed``: each try, and whether it stayed int8.
    """
    if probes <= 0 or len(chosen) < 2:
        return chosen
    graph = list(build.float_model.graph)
    try:
        shapes = concrete_shapes(build.float_model, resolve_input_shapes(
            build.float_model, ctx.input_shapes, (ctx.calib,)))
    except UserError:
        return chosen
    costs = {i: node_macs(graph[i], shapes) or 0 for i in chosen}
    tries: list[dict[str, object]] = []
    trace["trimmed"] = tries
    kept = set(chosen)
    for i in sorted((i for i in chosen if costs[i] > 0), key=lambda i: -costs[i])[:probes]:
        value = score(build.model(fixed | (kept - {i})), ref)
        back = value.meets(targets)
        logger.info("fallback: %s back to int8 -> %s", node_label(graph[i]), value)
        tries.append({"node": node_label(graph[i]), "macs": costs[i], "int8": back,
                      **value.to_dict()})
        if back:
            kept.discard(i)
            trace["best"] = {"float_nodes": len(kept), **value.to_dict()}  # the model kept
    return kept


def _mixed(build: Builder, ctx: PassContext, o: QuantizeOptions, ref: EvalData,
           targets: Targets, fixed: set[int], probes: int,
           trace: dict[str, object]) -> set[int] | None:
    """Stage 4: the MatMuls dynamic int8, Conv/ConvTranspose/Gemm static, the rest float.

    Its trace goes to ``trace[MIXED]``. Returns the nodes to keep float, with
    ``build.dynamic`` left on, or None (and ``build.dynamic`` as it was).
    """
    dynamic_before, build.dynamic = build.dynamic, True
    model, plan, rewritten = build.copy(fixed)
    base = score(model, ref)
    logger.info("fallback: MatMuls dynamic, %s static -> %s", "/".join(sorted(WEIGHTED_OPS)),
                base)
    sub: dict[str, object] = {"score_base": base.to_dict(), "static_nodes": len(plan.nodes)}
    trace[MIXED] = sub
    if base.meets(targets) and plan.nodes:
        sub.update(reached=True, best={"float_nodes": 0, **base.to_dict()})
        return fixed
    if probes > 1 and plan.nodes:
        order = _ranking(build, ctx, o, model, plan, rewritten)
        # fewer than all of them: every one float is the last probe's model
        cap = min(_float_cap(o, order), len(order) - 1)
        chosen, steps = choose_float_nodes(order, lambda kept: build.model(fixed | kept), ref,
                                           targets, base, cap, probes - 1)
        sub.update({k: v for k, v in steps.items() if k not in ("score_all_quantized",
                                                                "targets")})
        if chosen is not None:
            return fixed | chosen
    else:
        sub.update(reached=False, best={"float_nodes": 0, **base.to_dict()})
    build.dynamic = dynamic_before
    return None


def _float_cap(o: QuantizeOptions, order: list[int]) -> int:
    """Most of ``order`` a stage may keep float: ``max_float_nodes``, else half of them (at
    least :data:`MIN_FLOAT_CAP`)."""
    if o.max_float_nodes is not None:
        return o.max_float_nodes
    return max(MIN_FLOAT_CAP, len(order) // 2)


def _ranking(build: Builder, ctx: PassContext, o: QuantizeOptions, model: ir.Model,
             plan: Plan, rewritten: Rewritten) -> list[int]:
    """Planned nodes of ``model``, most sensitive first (:func:`.rank_by_added_error`)."""
    float_nodes = list(build.float_model.graph)
    candidates = [(p.index, float_nodes[p.index], p.activations) for p in plan.nodes
                  if p.rule.output != SAME]
    wanted = {v.name for _, node, acts in candidates
              for v in [node.outputs[0], *(node.inputs[i] for i in acts)]
              if v is not None and v.producer() is not None}
    names = as_read(model, {k: rewritten.names.get(k, k) for k in wanted})
    sqnr = tensor_sqnr(build.float_model, model, names, ctx.calib, limit=o.sqnr_samples,
                       batch_size=o.batch_size, input_shapes=ctx.input_shapes,
                       per_channel=True)
    order = rank_by_added_error(candidates, sqnr)
    return order + [i for i, _, _ in candidates if i not in set(order)]  # unmeasured last


def static_best(trace: dict) -> str:
    """The best static probe of the search, e.g. ``best probe agreement 0.708 with 16 of 51
    candidate nodes float``."""
    best = trace.get("best") or {}
    where = (f"{best.get('float_nodes')} of {trace.get('candidates')} candidate nodes float"
             if best else "all int8")
    if best and trace.get("elementwise_float"):
        where += " and the elementwise ops float"
    return f"best probe {_fmt(best)} with {where}"


def mixed_best(trace: dict) -> str | None:
    """Stage 4's kept or best probe, e.g. ``agreement 0.729 with the MatMuls dynamic and 19
    of 38 Conv/ConvTranspose/Gemm float``; None when it did not run."""
    sub = trace.get(MIXED)
    if not isinstance(sub, dict):
        return None
    best = sub.get("best") or {}
    return (f"{_fmt(best)} with the MatMuls dynamic and {best.get('float_nodes', 0)} of "
            f"{sub.get('static_nodes')} Conv/ConvTranspose/Gemm float")


def dynamic_note(trace: object) -> str | None:
    """The report's line on why the MatMuls are dynamic, when the search chose it."""
    if not isinstance(trace, dict):
        return None
    if "score_dynamic_matmul_only" in trace:
        text = f"no static int8 model met the quality floor ({static_best(trace)}"
        mixed = mixed_best(trace)
        return (f"{text}{'; ' + mixed if mixed else ''}), every other node stays float")
    sub = trace.get(MIXED)
    if isinstance(sub, dict) and sub.get("reached"):
        return (f"no all-static int8 model met the quality floor ({static_best(trace)}); "
                f"kept: {mixed_best(trace)}, the other ops float")
    return None


def missed(trace: object) -> str:
    """The refusal when no probe met the targets: the best one and what it aimed for."""
    assert isinstance(trace, dict)
    text = f"int8 stays below the quality floor: {static_best(trace)}"
    mixed = mixed_best(trace)
    if mixed:
        text += f"; {mixed}"
    dynamic = trace.get("score_dynamic_matmul_only")
    if dynamic:
        text += f"; {_fmt(dynamic)} with only the MatMuls int8 (dynamic)"
    return (f"{text}; target {_fmt(trace.get('targets') or {})}; nothing quantized "
            "(see stats 'fallback')")


def _fmt(score: dict) -> str:
    """``agreement 0.917, SQNR 6.7 dB`` from a score's (or the targets') dict."""
    parts = []
    if score.get("agreement") is not None:
        parts.append(f"agreement {score['agreement']:.3f}")
    if score.get("sqnr_db") is not None:
        worst = f" in {score['sqnr_worst']}" if score.get("sqnr_worst") else ""
        parts.append(f"SQNR {score['sqnr_db']:.1f} dB{worst}")
    return ", ".join(parts) or "-"


def as_read(model: ir.Model, names: dict[str, str]) -> dict[str, str]:
    """Map each tensor to the value its readers see: the output of its DequantizeLinear.

    Tensors that are not in ``model`` are dropped; those without a QuantizeLinear map to
    themselves.
    """
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    read = {}
    for key, name in names.items():
        value = values.get(name)
        if value is None:
            continue
        read[key] = name
        for use in value.uses():
            if use.node.op_type != "QuantizeLinear":
                continue
            dq = [u.node for u in use.node.outputs[0].uses()
                  if u.node.op_type == "DequantizeLinear"]
            if dq and dq[0].outputs[0].name:
                read[key] = dq[0].outputs[0].name
                break
    return read
