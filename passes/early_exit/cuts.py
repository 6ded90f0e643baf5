"""Cut points of a model (tensors every input-to-output path passes through) and stage splitting.

Idea. Build the dataflow graph whose vertices are tensors and whose edges run from each data
input of a node (values its subgraphs capture count as inputs) to each of its outputs. Add a
source feeding every graph input and a sink fed by every graph output. A tensor ``T`` is a cut
point when it dominates the sink: every path from the inputs to the outputs passes through it.
Then every node the outputs need either runs before ``T`` or can be computed from ``T`` alone
(plus constants), so the model splits at ``T`` into two models whose composition is the
original. The dominators of the sink form a chain (networkx ``immediate_dominators`` from the
source); walking it back from the sink lists the cut points in execution order.

Constants (initializers and anything computed only from them) never depend on the inputs, so
they do not block a cut; a stage copies the constant nodes it needs.

A cut is *valid* when at least one weighted layer (an op in :data:`LAYER_OPS`) runs on each
side of it: cutting a single-layer network gives nothing worth running separately.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx
import onnx_ir as ir
from onnx_ir.analysis import analyze_implicit_usage

from onnxopt.cost import node_macs as known_macs
from onnxopt.errors import UserError
from onnxopt.ir import is_standard, subgraphs
from onnxopt.shapes import concrete_shapes

logger = logging.getLogger(__name__)

#: Ops that count as a weighted layer for the "a layer on each side" rule.
LAYER_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger",
    "QLinearMatMul", "Einsum", "RNN", "GRU", "LSTM", "Attention",
})

#: Default positions of automatic exits, as fractions of the model's MACs.
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
#: Positions of the candidate exits the planner chooses from (see :mod:`.planning`).
CANDIDATE_FRACTIONS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85)

_SOURCE = "__source__"
_SINK = "__sink__"


class CutError(UserError):
    """A model without a valid cut point, or a requested cut that is not one."""


@dataclass(frozen=True)
class CutPoint:
    """A tensor that splits the model in two.

    Attributes:
        name: Tensor name.
        index: Position in the chain of cut points (0 = earliest).
        macs_before: MACs per sample of every node needed to compute the tensor.
        total_macs: MACs per sample of the whole model.
        layers_before: Weighted layers before the cut.
        layers_after: Weighted layers after the cut.
        shape: Dims of the tensor (strings for symbolic dims), None if unknown.
    """

    name: str
    index: int
    macs_before: int
    total_macs: int
    layers_before: int
    layers_after: int
    shape: tuple[int | str, ...] | None

    @property
    def fraction(self) -> float:
        """Share of the model's MACs spent before the cut."""
        return self.macs_before / self.total_macs if self.total_macs else 0.0


def _data_inputs(node: ir.Node, captured: dict[ir.Graph, set[ir.Value]]) -> list[ir.Value]:
    """Explicit inputs of ``node`` plus main-graph values its subgraphs capture."""
    values = [v for v in node.inputs if v is not None]
    for sub in subgraphs(node):
        values.extend(v for v in captured.get(sub, ()) if v.graph is node.graph)
    return values


def dataflow_graph(graph: ir.Graph) -> nx.DiGraph:
    """Tensors as vertices, edges from node inputs to node outputs, plus source and sink."""
    captured = analyze_implicit_usage(graph)
    flow = nx.DiGraph()
    flow.add_node(_SOURCE)
    flow.add_node(_SINK)
    for value in graph.inputs:
        flow.add_edge(_SOURCE, value)
    for node in graph:
        inputs = _data_inputs(node, captured)
        for out in node.outputs:
            flow.add_node(out)
            for value in inputs:
                flow.add_edge(value, out)
    for value in graph.outputs:
        flow.add_edge(value, _SINK)
    return flow


def _dominator_chain(graph: ir.Graph) -> list[ir.Value]:
    """Tensors dominating the sink, in execution order (graph inputs and outputs excluded)."""
    flow = dataflow_graph(graph)
    if not nx.has_path(flow, _SOURCE, _SINK):
        return []
    idom = nx.immediate_dominators(flow, _SOURCE)
    chain: list[ir.Value] = []
    vertex = idom[_SINK]
    while vertex != _SOURCE:
        chain.append(vertex)
        vertex = idom[vertex]
    chain.reverse()
    return [v for v in chain if not v.is_graph_input() and not v.is_graph_output()]


def _closure(values: Iterable[ir.Value], boundary: set[ir.Value],
             captured: dict[ir.Graph, set[ir.Value]]) -> list[ir.Node]:
    """Nodes needed to compute ``values`` when the ``boundary`` tensors are given."""
    seen: set[ir.Node] = set()
    order: list[ir.Node] = []
    visited: set[ir.Value] = set()
    stack = [v for v in values if v not in boundary]
    while stack:
        value = stack.pop()
        if value in visited or value in boundary:
            continue
        visited.add(value)
        node = value.producer()
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(v for v in _data_inputs(node, captured)
                     if v not in visited and v not in boundary)
    return order


def _is_layer(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type in LAYER_OPS


def _dims(value: ir.Value) -> tuple[int | str, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def all_cut_points(model: ir.Model) -> list[CutPoint]:
    """Every tensor that dominates the outputs, valid or not, in execution order.

    MACs are per sample at the model's own input dims (a dynamic leading axis at 1); a node
    whose MACs need a dim those leave unknown counts 0.
    """
    graph = model.graph
    chain = _dominator_chain(graph)
    captured = analyze_implicit_usage(graph)
    needed = _closure(graph.outputs, set(graph.inputs), captured)
    shapes = concrete_shapes(model)

    def node_macs(node: ir.Node) -> int:
        return known_macs(node, shapes) or 0

    total_macs = sum(node_macs(n) for n in needed)
    total_layers = sum(_is_layer(n) for n in needed)
    points: list[CutPoint] = []
    macs = layers = 0
    boundary: set[ir.Value] = set(graph.inputs)
    for value in chain:
        stage = _closure([value], boundary, captured)
        macs += sum(node_macs(n) for n in stage)
        layers += sum(_is_layer(n) for n in stage)
        boundary.add(value)
        boundary.update(o for n in stage for o in n.outputs)
        points.append(CutPoint(value.name or "", len(points), macs, total_macs, layers,
                               total_layers - layers, _dims(value)))
    return points


def find_cut_points(model: ir.Model) -> list[CutPoint]:
    """The valid cut points: a weighted layer on each side, in execution order."""
    return [p for p in all_cut_points(model) if p.layers_before and p.layers_after]


def require_cut_points(model: ir.Model) -> list[CutPoint]:
    """Like :func:`find_cut_points`, but a model without any is a :class:`CutError`."""
    points = find_cut_points(model)
    if not points:
        raise CutError(
            "model has no valid cut point: no tensor that every path from the inputs to the "
            "outputs passes through has a weighted layer (Conv, Gemm, MatMul, ...) on both "
            "sides, so it cannot be split into stages")
    return points


def resolve_cuts(points: Sequence[CutPoint], names: Sequence[str]) -> list[CutPoint]:
    """The cut points named by the user, in execution order.

    Raises:
        CutError: A name is not a valid cut point (the message lists some that are) or is
            given twice.
    """
    by_name = {p.name: p for p in points}
    chosen: list[CutPoint] = []
    for name in names:
        if name not in by_name:
            sample = ", ".join(p.name for p in points[:12])
            more = ", ..." if len(points) > 12 else ""
            raise CutError(f"tensor {name!r} is not a valid cut point; valid cut points: "
                           f"{sample}{more}")
        if by_name[name] in chosen:
            raise CutError(f"cut point {name!r} is named twice")
        chosen.append(by_name[name])
    return sorted(chosen, key=lambda p: p.index)


def choose_cuts(points: Sequence[CutPoint], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                slack: float = 0.02) -> list[CutPoint]:
    """Cut points near the given fractions of the model's MACs, one per fraction.

    The nearest cut point wins; then cheap trailing ops (activations, adds) are taken along:
    the choice moves to a later cut point while that costs at most ``slack`` of the MACs,
    so a cut lands after a block's final Relu rather than before it. Duplicates are dropped.
    """
    if not points:
        return []
    chosen: list[CutPoint] = []
    for target in sorted(fractions):
        position = min(range(len(points)),
                       key=lambda i: (abs(points[i].fraction - target), i))
        best = points[position]
        while position + 1 < len(points) and \
                points[position + 1].fraction - best.fraction <= slack:
            position += 1
        pick = points[position]
        if pick not in chosen:
            chosen.append(pick)
    return sorted(chosen, key=lambda p: p.index)


def stage_nodes(graph: ir.Graph, cuts: Sequence[str]) -> list[list[ir.Node]]:
    """The nodes of each stage, in graph order: stage k computes cut k from cut k-1.

    A node needed by several stages (a constant computation) is listed in the first.
    """
    values = {v.name: v for v in _named_values(graph)}
    boundary: set[ir.Value] = set(graph.inputs)
    stages: list[list[ir.Node]] = []
    targets = [[values[name]] for name in cuts] + [list(graph.outputs)]
    order = {id(n): i for i, n in enumerate(graph)}
    captured = analyze_implicit_usage(graph)
    taken: set[ir.Node] = set()
    for target in targets:
        nodes = [n for n in _closure(target, boundary, captured) if n not in taken]
        taken.update(nodes)
        boundary.update(target)
        boundary.update(o for n in nodes for o in n.outputs)
        stages.append(sorted(nodes, key=lambda n: order[id(n)]))
    return stages


def _named_values(graph: ir.Graph) -> Iterable[ir.Value]:
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def split_model(model: ir.Model, cuts: Sequence[str]) -> list[ir.Model]:
    """Cut ``model`` into stage models at the named cut points.

    Stage 0 maps the model inputs to ``cuts[0]``, stage k maps ``cuts[k-1]`` to ``cuts[k]``,
    and the last stage maps the last cut to the model outputs. Each stage is a standalone
    model with copies of only the nodes and initializers it uses, so running the stages in
    sequence reproduces the original outputs.

    Raises:
        CutError: A name is not a cut point of the model, or the cuts are out of order.
    """
    points = {p.name: p for p in all_cut_points(model)}
    previous = -1
    for name in cuts:
        if name not in points:
            raise CutError(f"tensor {name!r} is not a cut point of the model")
        if points[name].index <= previous:
            raise CutError(f"cut points must be distinct and in execution order: {list(cuts)}")
        previous = points[name].index
    graph = model.graph
    bounds = [list(graph.inputs), *[[name] for name in cuts], list(graph.outputs)]
    # extract() collects initializers in an order that depends on object ids; keep the
    # model's order so that the same model always gives the same stage files.
    order = {name: i for i, name in enumerate(graph.initializers)}
    stages = []
    for k in range(len(bounds) - 1):
        sub = ir.convenience.extract(graph, bounds[k], bounds[k + 1])
        sub.name = f"{graph.name or 'graph'}_stage{k}"
        initializers = sorted(sub.initializers.values(), key=lambda v: order.get(v.name, -1))
        sub.initializers.clear()
        for value in initializers:
            sub.initializers.add(value)
        stages.append(ir.Model(sub, ir_version=model.ir_version, producer_name="onnxopt",
                               functions=list(model.functions.values())))
    logger.info("split into %d stages at %s", len(stages), ", ".join(cuts))
    return stages
