"""The ``early-exit`` pass: exit heads at cut points, later stages inside ``If`` branches.

The model is split at cut points (:mod:`.cuts`) into stages ``S_0 .. S_K``; at the end of each
stage ``k < K`` an exit head (:mod:`.planning`) gives logits ``h_k`` and the margin ``c_k`` of
its top two logits, and ``w_k = c_k < t_k`` marks the samples that go on. From opset 11 the
rewrite is *batched*: only the samples that go on run the later stages, gathered from the
batch and scattered back into place (plain ONNX, no runner needed):

    level k:  S_k; head k; w_k; rows_k = NonZero(w_k)
              O_k = If(any(w_k), then: ScatterND(h_k, rows_k, O_{k+1}(GatherND(X_k, rows_k))),
                                 else: h_k)                     with O_K = S_K's output

At batch 1 a confident sample skips everything after its exit; in a batch the later stages
run on the rest only. A model whose inputs (and cuts) have a fixed batch size of 1 gets the
lean form instead, with no gather, scatter or reduction: ``O_k = If(c_k < t_k, then:
O_{k+1}, else: h_k)``. Below opset 11 the whole batch goes on while any sample is not done,
and ``Where(done_k, h_k, O_{k+1})`` picks each sample's answer. Per sample both are the bundle
runner's answer (the first confident exit's logits, else the full model's) for any batch.
The model output is ``O_0``, under the original output name. The rewrite is lossy
(``exact = False``); the pass manager measures it against the original model.

Nodes of stage ``k >= 1`` move into the then-branch of level ``k - 1``, together with the
initializers only they read; the cut tensor they read is replaced by its gathered rows.
Shapes are inferred into the branches at the end, so that onnxruntime can fuse and change the
layout of the convolutions there as it does in the main graph.
With ``single_file=false``, or in a dry run, the model is left unchanged and only the plan
is reported (write a bundle with ``onnxopt split``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.cost import infer_shapes
from onnxopt.ir import (
    FreshNames,
    clone_model,
    opset_version,
    remove_unused_initializers,
    subgraphs,
)
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from onnxopt.passes.early_exit.bundle import head_nodes, reduce_node
from onnxopt.passes.early_exit.cuts import (
    CANDIDATE_FRACTIONS,
    CutError,
    choose_cuts,
    require_cut_points,
    resolve_cuts,
    stage_nodes,
)
from onnxopt.passes.early_exit.exits import ExitPlan, ExitPlanError, exit_capable
from onnxopt.passes.early_exit.planning import plan_exits
from onnxopt.report import plural

logger = logging.getLogger(__name__)

#: Where, Or and If with outer-scope values need at least this ONNX opset.
_MIN_OPSET = 9
#: GatherND and ScatterND (the batched form) need at least this opset.
_MIN_BATCHED_OPSET = 11


@dataclass(frozen=True)
class EarlyExitOptions:
    """Options of ``early-exit``.

    Attributes:
        exits: Candidate cut tensor names; empty takes cut points at about 5, 15, ..., 85% of
            the MACs. Candidates that do not pay for their head are dropped.
        target: Promised top-1 agreement with the full model on new samples.
        confidence: None promises ``target`` in expectation (conformal risk control); a
            probability such as 0.9 promises it with that probability over the draw of the
            calibration samples (Learn-then-Test).
        head: ``ridge`` (closed form) or ``logistic`` (multinomial logistic regression).
        fit_to: Fit the heads to the full model's ``logits`` or to the ``labels``.
        pool: ``grid`` (2x2 mean pool where the cut allows) or ``avg`` (global average).
        head_share: Share of the calibration samples that fit the heads; the rest, held
            out, set the thresholds. None: half, but fewer when the thresholds would
            otherwise get too few for the promise (a quarter stays for the heads).
        exit_overhead: Decision cost of an exit as a share of the model's MACs, when
            choosing which exits to keep.
        single_file: Rewrite the model into the If form; false only reports the plan.
        l2: Regularisation of the heads, relative to the number of samples.
        folds: Folds for the out-of-fold logits (temperatures and the choice of exits).
        max_samples: Cap on calibration samples (None uses all).
    """

    exits: tuple[str, ...] = ()
    target: float = option(0.99, within="(0, 1]")
    confidence: float | None = option(None, within="(0, 1)")
    head: Literal["ridge", "logistic"] = "ridge"
    fit_to: Literal["logits", "labels"] = "logits"
    pool: Literal["grid", "avg"] = "grid"
    head_share: float | None = option(None, within="(0, 1)")
    exit_overhead: float = option(0.01, within="[0, 1]")
    single_file: bool = True
    l2: float = option(1e-3, within="[0, inf)")
    folds: int = option(5, within="[1, inf)")
    max_samples: int | None = option(None, within="[1, inf)")


@register_pass
class EarlyExitPass(Pass):
    """Add confident early exits; later stages run only when needed."""

    name = "early-exit"
    description = ("split at cut points, add exit heads fitted on calibration data, skip "
                   "later stages via If when confident")
    Options = EarlyExitOptions
    exact = False
    needs_data = True
    min_samples = 32
    supports_dry_run = True
    tolerance = Tolerance()

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: EarlyExitOptions = self.options
        result = PassResult(modified=False)
        if ctx.calib is None:
            result.refuse("model", "needs calibration data")
            return result
        if opset_version(model) < _MIN_OPSET:
            result.refuse("model", f"opset {opset_version(model)} is below {_MIN_OPSET}")
            return result
        shaped = model
        if any(v.shape is None for node in model.graph for v in node.outputs):
            shaped = infer_shapes(clone_model(model))  # analyse a copy; rewrite the original
        try:
            points = [p for p in require_cut_points(shaped) if exit_capable(p)]
        except CutError as exc:
            result.refuse("model", str(exc))
            return result
        if not points:
            result.refuse("model", "no cut point has the known [N, C, ...] shape an exit head "
                                   "needs")
            return result
        # A name that is not a cut point is the user's mistake: CutError propagates.
        cuts = (resolve_cuts(points, opts.exits) if opts.exits
                else choose_cuts(points, CANDIDATE_FRACTIONS))
        try:
            plan = plan_exits(shaped, ctx.calib, cuts, target=opts.target,
                              confidence=opts.confidence, head=opts.head, fit_to=opts.fit_to,
                              pool_kind=opts.pool, l2=opts.l2, folds=opts.folds, seed=ctx.seed,
                              head_share=opts.head_share, exit_overhead=opts.exit_overhead,
                              input_shapes=ctx.input_shapes, limit=opts.max_samples)
        except ExitPlanError as exc:
            result.refuse("model", str(exc))
            return result
        result.stats = plan.to_dict()
        if plan.calib_report is not None and plan.guarantee is not None:
            cal = plan.calib_report
            result.summary = (
                f"{plural(len(plan.heads), 'exit')} at {', '.join(h.cut for h in plan.heads)}; "
                f"{plan.guarantee.describe()}; on those held-out samples: agreement "
                f"{cal.agreement:.4f}, expected MACs {cal.macs_ratio:.3f}x (the MACs column "
                f"counts the worst case)")
            result.promised_agreement = plan.guarantee.target
            result.promise_caveat = (
                "a promise in expectation holds on average over calibration draws, and a "
                "single draw can fall short (more calibration samples, unlabelled ones too, "
                "narrow the spread; confidence=P promises it for a share P of draws)"
                if plan.guarantee.confidence is None else
                f"the promise holds for a share {plan.guarantee.confidence:g} of calibration "
                f"draws, and a few validation samples measure it coarsely")
        for name, reason in plan.dropped.items():
            result.refuse(name, f"exit {reason}; dropped")
        if opts.single_file and not ctx.dry_run:
            build_if_form(model, plan)
            result.modified = True
        return result


class _Names(FreshNames):
    """Fresh value and node names, unique across the model and its subgraphs."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__(model.graph)

    def prefix(self, base: str) -> str:
        """A fresh name that no taken name starts with (for a family of derived names)."""
        name, i = base, 0
        while any(t.startswith(name) for t in self.taken if t):
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _named(node: ir.Node, name: str) -> ir.Node:
    node.name = name
    node.outputs[0].name = name
    return node


def build_if_form(model: ir.Model, plan: ExitPlan) -> None:
    """Rewrite ``model`` in place into the nested-If early-exit form of ``plan``."""
    graph = model.graph
    opset = opset_version(model)
    single = _batch_of_one(model, plan.cuts)
    names = _Names(model)
    stages = stage_nodes(graph, plan.cuts)
    values = {v.name: v for n in graph for v in n.outputs}
    output = graph.outputs[0]
    out_name, out_type, out_shape = output.name, output.type, output.shape
    moved = [node for stage in stages[1:] for node in stage]
    needed = {node for stage in stages for node in stage}
    graph.remove([n for n in graph if n not in needed], safe=True)
    graph.remove(moved)
    graph.outputs.clear()
    output.name = names(f"{out_name}_full")
    stage_of = {node: k for k, stage in enumerate(stages) for node in stage}
    owners: dict[int, list[ir.Value]] = {}
    for value in list(graph.initializers.values()):
        users = {stage_of.get(use.node, 0) for use in value.uses()}
        if users and min(users) > 0 and not value.is_graph_output():
            del graph.initializers[value.name]
            owners.setdefault(min(users), []).append(value)
    batched = (not single and opset >= _MIN_BATCHED_OPSET
               and not _captures(stages, [values[c] for c in plan.cuts]))

    def node(op: str, inputs: list[ir.Value], name: str, **attributes: object) -> ir.Node:
        return _named(ir.node(op, inputs, attributes), names(name))

    def level(k: int, done: ir.Value | None) -> tuple[list[ir.Node], list[ir.Value], ir.Value]:
        """Nodes, initializers and result value of stage k and everything after it."""
        if k == len(plan.heads):
            return list(stages[k]), owners.get(k, []), output
        head = plan.heads[k]
        prefix = names.prefix(f"exit{k}")
        cut = values[head.cut]
        parts = head_nodes(cut, head, opset, prefix)
        nodes = [*stages[k], *parts.nodes]
        inits = [*owners.get(k, []), *parts.initializers]
        threshold = ir.Value(name=names(f"{prefix}_threshold"), shape=ir.Shape([]),
                             type=ir.TensorType(ir.DataType.FLOAT),
                             const_value=ir.tensor(head.threshold, dtype=ir.DataType.FLOAT))
        inits.append(threshold)
        below = node("Less", [parts.confidence, threshold], f"{prefix}_below")
        waiting = below.outputs[0]  # [N, 1]: samples that go on
        mask = done_now = None
        if single:
            # One sample: it goes on or it exits, so the If needs no gather, scatter or pick.
            cond = below
            nodes.append(below)
        elif batched:
            # One decision: does any sample go on (is the lowest margin below the threshold)?
            low_name = names(f"{prefix}_lowest")
            low = _named(reduce_node("ReduceMin", parts.confidence, None, 0, opset, inits,
                                     low_name), low_name)
            cond = node("Less", [low.outputs[0], threshold], f"{prefix}_any")
            nodes += [low, cond]
        else:
            mask = node("Not", [waiting], f"{prefix}_mask")
            nodes += [below, mask]
            done_now = mask.outputs[0]
            if done is not None:
                nodes.append(node("Or", [done, done_now], f"{prefix}_done"))
                done_now = nodes[-1].outputs[0]
                nodes.append(node("Not", [done_now], f"{prefix}_waiting"))
                waiting = nodes[-1].outputs[0]
            as_float = node("Cast", [waiting], f"{prefix}_waiting_f", to=ir.DataType.FLOAT)
            any_name = names(f"{prefix}_any_f")
            any_ = _named(reduce_node("ReduceMax", as_float.outputs[0], None, 0, opset, inits,
                                      any_name), any_name)
            cond = node("Cast", [any_.outputs[0]], f"{prefix}_any", to=ir.DataType.BOOL)
            nodes += [as_float, any_, cond]
        early = node("Identity", [parts.logits], f"{prefix}_early")
        _typed(early.outputs[0], out_type, out_shape)
        early_graph = ir.Graph([], early.outputs, nodes=[early], name=names(f"{prefix}_exit"))

        def decide(go_nodes: list[ir.Node], go_out: ir.Value,
                   go_inits: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value], ir.Value]:
            """The exit's If: the early answer, or the branch that goes on."""
            go_graph = ir.Graph([], [go_out], nodes=go_nodes, initializers=go_inits,
                                name=names(f"{prefix}_go_on"))
            branch = _named(ir.node("If", [cond.outputs[0]], {"then_branch": go_graph,
                                                              "else_branch": early_graph},
                                    num_outputs=1), names(f"{prefix}_result"))
            _typed(branch.outputs[0], out_type, out_shape)
            nodes.append(branch)
            return nodes, inits, branch.outputs[0]

        if single:
            inner_nodes, inner_inits, inner_out = level(k + 1, None)
            return decide(inner_nodes, inner_out, inner_inits)
        if batched:
            # Only the samples that go on run further: gather them, scatter their answers.
            # NonZero of the mask flattened to [N] is [1, M]; its transpose is the [M, 1]
            # row indices GatherND and ScatterND take. Every shape here follows from shape
            # inference (a Slice of a [2, M] NonZero left the rank of the gathered rows
            # unknown, and onnxruntime then left residual Adds in the branches unfused).
            flat = node("Reshape", [waiting, _flat_shape(names, prefix, inits)],
                        f"{prefix}_flat")
            rows = node("NonZero", [flat.outputs[0]], f"{prefix}_rows")
            column = node("Transpose", [rows.outputs[0]], f"{prefix}_column")
            rest = node("GatherND", [cut, column.outputs[0]], f"{prefix}_rest")
            _typed(rest.outputs[0], cut.type, ir.Shape(["M", *list(cut.shape or ())[1:]])
                   if cut.shape is not None else None)
            for later in stages[k + 1]:
                for i, value in enumerate(later.inputs):
                    if value is cut:
                        later.replace_input_with(i, rest.outputs[0])
            inner_nodes, inner_inits, inner_out = level(k + 1, None)
            merge = node("ScatterND", [parts.logits, column.outputs[0], inner_out],
                         f"{prefix}_merged")
            go_nodes = [below, flat, rows, column, rest, *inner_nodes, merge]
        else:
            inner_nodes, inner_inits, inner_out = level(k + 1, done_now)
            assert mask is not None
            merge = node("Where", [mask.outputs[0], parts.logits, inner_out],
                         f"{prefix}_merged")
            go_nodes = [*inner_nodes, merge]
        _typed(merge.outputs[0], out_type, out_shape)
        return decide(go_nodes, merge.outputs[0], inner_inits)

    nodes, inits, result = level(0, None)
    new_nodes = [n for n in nodes if n.graph is None]
    graph.extend(new_nodes)
    for value in inits:
        if value.graph is None:
            graph.register_initializer(value)
    result.name = out_name
    graph.outputs.append(result)
    remove_unused_initializers(graph)
    infer_shapes(model)  # shapes inside the branches let onnxruntime fuse and reorder there
    logger.info("early-exit: %d exits at %s (%s)", len(plan.heads), ", ".join(plan.cuts),
                "one sample" if single else "batched" if batched else "whole batches")


def _batch_of_one(model: ir.Model, cuts: list[str]) -> bool:
    """Whether the model takes exactly one sample: every input and cut has batch size 1."""
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    if not inputs or any(v.shape is None or len(v.shape) == 0 or v.shape[0] != 1
                         for v in inputs):
        return False
    shaped = infer_shapes(clone_model(model))
    found = {v.name: v for node in shaped.graph for v in node.outputs}
    return all(c in found and found[c].shape is not None and len(found[c].shape) > 0
               and found[c].shape[0] == 1 for c in cuts)


def _flat_shape(names: _Names, prefix: str, inits: list[ir.Value]) -> ir.Value:
    """The Reshape shape ``[-1]`` that flattens a ``[N, 1]`` mask to ``[N]``."""
    name = names(f"{prefix}_flat_shape")
    value = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.asarray([-1], dtype=np.int64), name=name))
    inits.append(value)
    return value


def _captures(stages: list[list[ir.Node]], cuts: list[ir.Value]) -> bool:
    """Whether a subgraph in a later stage reads a cut tensor from its enclosing scope."""
    wanted = set(cuts)
    for stage in stages[1:]:
        for node in stage:
            for sub in subgraphs(node):
                for inner in sub.all_nodes():
                    if any(v in wanted for v in inner.inputs):
                        return True
    return False


def _typed(value: ir.Value, type_: ir.TypeProtocol | None, shape: ir.Shape | None) -> None:
    value.type = type_
    value.shape = shape
