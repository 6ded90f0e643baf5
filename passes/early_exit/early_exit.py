"""The ``early-exit`` pass: exit heads at cut points, later stages inside ``If`` branches.

The model is split at cut points (:mod:`.cuts`) into stages ``S_0 .. S_K``;
at the end of each stage ``k < K`` an exit head fitted on calibration data
(:mod:`.exits`) gives logits ``h_k`` and a confidence ``c_k``, and
``m_k = c_k >= t_k`` says which samples may stop there. The rewrite nests the stages in ``If``
branches so that a plain onnxruntime session skips the later stages when every sample in the
batch is done (at batch 1: when the one sample is confident):

    level k:  S_k; head k; m_k; d_k = d_{k-1} or m_k (d_0 = m_0)
              O_k = If(all(d_k), then: h_k,
                                 else: Where(m_k, h_k, O_{k+1}))   with O_K = S_K's output

The model output is ``O_0``, under the original output name. Per sample this is exactly the
bundle runner's answer (the first confident exit's logits, else the full model's), for any
batch size; a batch only saves work when all its samples are done early. The rewrite is lossy
(``exact = False``); the pass manager measures it against the original model.

Nodes of stage ``k >= 1`` move into the else-branch of level ``k - 1``, together with the
initializers only they read; values of earlier stages are read from the enclosing scope.
With ``single_file=false``, or in a dry run, the model is left unchanged and only the plan
is reported (write a bundle with ``onnxopt split``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from onnxopt.cost import infer_shapes
from onnxopt.ir import FreshNames, clone_model, opset_version, remove_unused_initializers
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from onnxopt.passes.early_exit.bundle import head_nodes, reduce_node
from onnxopt.passes.early_exit.cuts import (
    CutError,
    choose_cuts,
    require_cut_points,
    resolve_cuts,
    stage_nodes,
)
from onnxopt.passes.early_exit.exits import ExitPlan, ExitPlanError, exit_capable, plan_exits
from onnxopt.report import plural

logger = logging.getLogger(__name__)

#: Where, Or and If with outer-scope values need at least this ONNX opset.
_MIN_OPSET = 9


@dataclass(frozen=True)
class EarlyExitOptions:
    """Options of ``early-exit``.

    Attributes:
        exits: Cut tensor names; empty chooses cuts at about 25/50/75% of the MACs.
        target: Minimum top-1 agreement with the full model, per exit, on calibration data.
        head: ``ridge`` (closed form) or ``logistic`` (multinomial logistic regression).
        fit_to: Fit the heads to the full model's ``logits`` or to the ``labels``.
        single_file: Rewrite the model into the If form; false only reports the plan.
        l2: Regularisation of the heads, relative to the number of samples.
        folds: Folds for the out-of-fold confidences the thresholds are chosen on.
        max_samples: Cap on calibration samples (None uses all).
    """

    exits: tuple[str, ...] = ()
    target: float = option(0.99, within="(0, 1]")
    head: Literal["ridge", "logistic"] = "ridge"
    fit_to: Literal["logits", "labels"] = "logits"
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
        cuts = resolve_cuts(points, opts.exits) if opts.exits else choose_cuts(points)
        try:
            plan = plan_exits(shaped, ctx.calib, cuts, target=opts.target, head=opts.head,
                              fit_to=opts.fit_to, l2=opts.l2, folds=opts.folds, seed=ctx.seed,
                              input_shapes=ctx.input_shapes, limit=opts.max_samples)
        except ExitPlanError as exc:
            result.refuse("model", str(exc))
            return result
        result.stats = plan.to_dict()
        if plan.calib_report is not None:
            cal = plan.calib_report
            result.summary = (
                f"{plural(len(plan.heads), 'exit')} at {', '.join(h.cut for h in plan.heads)}; on "
                f"calibration data: agreement {cal.agreement:.4f}, expected MACs "
                f"{cal.macs_ratio:.3f}x (the MACs column counts the worst case)")
        for name in plan.dropped:
            result.refuse(name, f"exit never reaches agreement {opts.target}; dropped")
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

    def level(k: int, done: ir.Value | None) -> tuple[list[ir.Node], list[ir.Value], ir.Value]:
        """Nodes, initializers and result value of stage k and everything after it."""
        if k == len(plan.heads):
            return list(stages[k]), owners.get(k, []), output
        head = plan.heads[k]
        prefix = names.prefix(f"exit{k}")
        parts = head_nodes(values[head.cut], head, opset, prefix, keepdims=True)
        nodes = [*stages[k], *parts.nodes]
        inits = [*owners.get(k, []), *parts.initializers]
        threshold = ir.Value(name=names(f"{prefix}_threshold"), shape=ir.Shape([]),
                             type=ir.TensorType(ir.DataType.FLOAT),
                             const_value=ir.tensor(head.threshold, dtype=ir.DataType.FLOAT))
        inits.append(threshold)
        below = _named(ir.node("Less", [parts.confidence, threshold]), names(f"{prefix}_below"))
        mask = _named(ir.node("Not", [below.outputs[0]]), names(f"{prefix}_mask"))
        nodes += [below, mask]
        done_now = mask.outputs[0]
        if done is not None:
            nodes.append(_named(ir.node("Or", [done, done_now]), names(f"{prefix}_done")))
            done_now = nodes[-1].outputs[0]
        as_float = _named(ir.node("Cast", [done_now], {"to": ir.DataType.FLOAT}),
                          names(f"{prefix}_done_f"))
        every_name = names(f"{prefix}_all_f")
        every = _named(reduce_node("ReduceMin", as_float.outputs[0], None, 0, opset, inits,
                                   every_name), every_name)
        cond = _named(ir.node("Cast", [every.outputs[0]], {"to": ir.DataType.BOOL}),
                      names(f"{prefix}_all"))
        nodes += [as_float, every, cond]
        then_out = _named(ir.node("Identity", [parts.logits]), names(f"{prefix}_early"))
        _typed(then_out.outputs[0], out_type, out_shape)
        then_graph = ir.Graph([], then_out.outputs, nodes=[then_out], name=names(f"{prefix}_then"))
        inner_nodes, inner_inits, inner_out = level(k + 1, done_now)
        merge = _named(ir.node("Where", [mask.outputs[0], parts.logits, inner_out]),
                       names(f"{prefix}_merged"))
        _typed(merge.outputs[0], out_type, out_shape)
        else_graph = ir.Graph([], merge.outputs, nodes=[*inner_nodes, merge],
                              initializers=inner_inits, name=names(f"{prefix}_else"))
        branch = _named(ir.node("If", [cond.outputs[0]], {"then_branch": then_graph,
                                                          "else_branch": else_graph},
                                num_outputs=1), names(f"{prefix}_result"))
        _typed(branch.outputs[0], out_type, out_shape)
        nodes.append(branch)
        return nodes, inits, branch.outputs[0]

    nodes, inits, result = level(0, None)
    new_nodes = [n for n in nodes if n.graph is None]
    graph.extend(new_nodes)
    for value in inits:
        if value.graph is None:
            graph.register_initializer(value)
    result.name = out_name
    graph.outputs.append(result)
    remove_unused_initializers(graph)
    logger.info("early-exit: %d exits at %s", len(plan.heads), ", ".join(plan.cuts))


def _typed(value: ir.Value, type_: ir.TypeProtocol | None, shape: ir.Shape | None) -> None:
    value.type = type_
    value.shape = shape
