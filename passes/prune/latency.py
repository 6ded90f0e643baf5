"""Latency cost of kept channels: per-node tables measured with onnxruntime, cached on disk.

HALP (Shen et al., 2022) and NetAdapt (Yang et al., 2018) prune against a latency lookup
table measured on the target instead of MACs. Here every node whose channels a candidate
group thins becomes a one-node model (its inputs at the concrete shapes at the measured batch
size, weights random, the group's axes scaled to a kept width) and is timed by onnxruntime on
this machine at a small grid of kept widths per group; its latency at other widths is the
multilinear interpolation of that grid (made monotone: measured noise must not make removing
channels look dearer). A table's factors are channel sets, not whole groups: the producer of
one slice of a concat group is timed at that slice's kept width (the knapsack thins a
group's slices unevenly), the concat and its consumers at the sum of the slices. The
latency of the model is then ``sum_nodes t_node(kept fractions)``, a
:class:`~onnxopt.passes.prune.channel_cost.CostModel` whose terms are these tables, so the
knapsack and the uniform allocator of :mod:`.budget` allocate against it unchanged.

Single nodes miss what onnxruntime does to the whole graph (fused activations, layout
reorders between NCHWc kernels, per-op dispatch), so the sum is calibrated on whole-model
timings: ``T(keep) = a + b * sum(keep)`` through the original model and one thinned copy,
timed side by side (:mod:`.latency_timing`, :mod:`.latency_plan`). Node times are cached on
disk per (op signature, machine, onnxruntime version, threads) (:mod:`.latency_cache`), so
a second plan measures nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.channels.groups import ChannelAnalysis, ChannelGroup, Member
from onnxopt.passes.prune.budget import Limits
from onnxopt.passes.prune.channel_cost import CostModel, CostTerm
from onnxopt.passes.prune.latency_cache import LatencyMeter
from onnxopt.shapes import ShapeTable

logger = logging.getLogger(__name__)

__all__ = ["NodeSpec", "TableTerm", "calibrated", "latency_model", "monotone", "node_specs"]

GRID_POINTS = (5, 4)
"""Kept widths measured per factor for nodes with one and with two factor groups."""


# -- one node as a model ----------------------------------------------------------------------


@dataclass
class NodeSpec:
    """A node made measurable at kept widths of its factor groups.

    Attributes:
        node: The node.
        factors: Group of each factor (a group can be two factors: a layer reading a
            prefix of a DenseNet concat and writing the next slice).
        sizes: Channels of each factor (its group's, or its concat slice's).
        inputs: Per input: (name, dims, dtype, constant or None, ``{axis: factor index}``).
        signature: JSON-able description that identifies its timings in the cache.
        opsets: Opset imports of the one-node model.
        output_types: Element types of the outputs.
        channels: Group channels of each factor (all of the group's, or one slice's).
    """

    node: ir.Node
    factors: list[int]
    sizes: list[int]
    inputs: list[tuple[str, tuple[int, ...], int, np.ndarray | None, dict[int, int]]]
    signature: dict[str, object] = field(default_factory=dict)
    opsets: dict[str, int] = field(default_factory=dict)
    output_types: list[int] = field(default_factory=list)
    channels: list[np.ndarray] = field(default_factory=list)

    def build(self, counts: Sequence[int], seed: int = 0
              ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The node alone, its factor groups at ``counts`` kept channels, and random feeds."""
        rng = np.random.default_rng(seed)
        proto = ir.serde.serialize_node(self.node)
        inputs, inits, feeds, names = [], [], {}, []
        for i, (name, dims, dtype, const, axes) in enumerate(self.inputs):
            if not name:
                names.append("")
                continue
            new = list(dims)
            for axis, f in axes.items():
                new[axis] = max(1, round(dims[axis] * counts[f] / self.sizes[f]))
            local = f"in{i}"
            names.append(local)
            np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
            if const is not None and not axes:
                inits.append(onnx.numpy_helper.from_array(const, local))
            elif const is not None:
                inits.append(onnx.numpy_helper.from_array(
                    (rng.standard_normal(new) * 0.1).astype(np_type), local))
            else:
                inputs.append(onnx.helper.make_tensor_value_info(local, dtype, new))
                feeds[local] = rng.standard_normal(new).astype(np_type)
            if i == 0 and self.node.op_type == "Conv":
                group = next((a for a in proto.attribute if a.name == "group"), None)
                if group is not None and group.i > 1:
                    group.i = new[1]  # depthwise (the only grouped conv a group thins)
        del proto.input[:]
        proto.input.extend(names)
        outputs = [f"out{j}" for j in range(len(proto.output))]
        del proto.output[:]
        proto.output.extend(outputs)
        graph = onnx.helper.make_graph(
            [proto], "latency", inputs,
            [onnx.helper.make_tensor_value_info(o, t, None)
             for o, t in zip(outputs, self.output_types, strict=True)], inits)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets)
        model.ir_version = min(model.ir_version, 9)
        return onnx.shape_inference.infer_shapes(model), feeds  # the outputs' shapes


def _channel_set(member: Member, size: int) -> tuple[int, ...]:
    if member.channels is None:
        return tuple(range(size))
    return tuple(int(c) for c in np.unique(member.channels))


def _factors(found: list[tuple[int, tuple[int, ...]]]) -> list[tuple[int, tuple[int, ...]]]:
    """The node's factors: per group, its channel sets that no other set there contains.

    A concat's output contains its inputs (one factor: the concat is costed from the sum of
    its slices), a producer of one slice has only that slice, and a layer that reads a prefix
    of a DenseNet concat and writes the next slice has two disjoint sets (two factors).
    """
    unique = list(dict.fromkeys(found))
    return [(g, s) for g, s in unique
            if not any(h == g and t != s and set(s) <= set(t) for h, t in unique)]


def _factor_of(factors: list[tuple[int, tuple[int, ...]]], group: int,
               channels: tuple[int, ...]) -> int:
    return next(i for i, (g, s) in enumerate(factors)
                if g == group and set(channels) <= set(s))


def node_specs(analysis: ChannelAnalysis, shapes: ShapeTable,
               groups: Sequence[ChannelGroup]) -> tuple[list[NodeSpec], list[str]]:
    """The nodes whose channels ``groups`` thin, made measurable; and the ones that are not.

    A node's factors are the channel sets of the groups it carries: a whole group, or the
    slice of a concat group one producer writes (each slice is thinned on its own by the
    knapsack, so its producer is costed by its own kept fraction, not the group's).
    A node is left out (named in the second list, its time then stays in the calibrated
    constant) when a dim is unknown, or it has more than two factors, or a grouped
    conv other than depthwise.
    """
    wanted = {g.index: g for g in groups}
    weights: dict[tuple[int, int], dict[int, tuple[int, tuple[int, ...]]]] = {}
    for g in groups:
        for m in g.weights:
            if m.node is not None:
                weights.setdefault((id(m.node), m.input_index), {})[m.axis] = (
                    g.index, _channel_set(m, g.size))
    opsets = {d or "": v for d, v in analysis.model.opset_imports.items()}
    specs, skipped = [], []
    for node in analysis.model.graph:
        axes_by_input: list[dict[int, tuple[int, tuple[int, ...]]]] = []
        found: list[tuple[int, tuple[int, ...]]] = []
        for i, value in enumerate(node.inputs):
            axes = dict(weights.get((id(node), i), {}))
            dims = shapes.dims(value) if value is not None else None
            for axis in range(len(dims or ())):
                hit = analysis.lookup(value, axis)
                if hit is not None and hit[0].index in wanted:
                    axes[axis] = (hit[0].index, _channel_set(hit[1], hit[0].size))
            axes_by_input.append(axes)
            found += axes.values()
        for value in node.outputs:
            for axis in range(len(shapes.dims(value) or ())):
                hit = analysis.lookup(value, axis)
                if hit is not None and hit[0].index in wanted:
                    found.append((hit[0].index, _channel_set(hit[1], hit[0].size)))
        if not found:
            continue
        factors = _factors(found)
        why = _unmeasurable(node, shapes, len(factors))
        if why:
            skipped.append(f"{node.op_type} '{node.name}': {why}")
            continue
        inputs = []
        for value, axes in zip(node.inputs, axes_by_input, strict=True):
            if value is None:
                inputs.append(("", (), 0, None, {}))
                continue
            const = value.const_value.numpy() if value.const_value is not None else None
            dims = tuple(const.shape) if const is not None else shapes.dims(value)
            dtype = int(value.dtype) if value.dtype is not None else onnx.TensorProto.FLOAT
            inputs.append((value.name or "x", tuple(int(d) for d in dims), dtype, const,
                           {a: _factor_of(factors, *f) for a, f in axes.items()}))
        sizes = [len(s) for _, s in factors]
        signature = {"op": node.op_type, "domain": node.domain or "",
                     "attrs": sorted((k, repr(a.value)) for k, a in node.attributes.items()),
                     "inputs": [(d, t, c is not None, sorted(a.items()))
                                for _, d, t, c, a in inputs],
                     "sizes": sizes, "opset": opsets.get(node.domain or "", 0)}
        types = [int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
                 for v in node.outputs]
        specs.append(NodeSpec(node, [g for g, _ in factors], sizes, inputs, signature, opsets,
                              types, [np.array(s, dtype=np.int64) for _, s in factors]))
    return specs, skipped


def _unmeasurable(node: ir.Node, shapes: ShapeTable, factors: int) -> str:
    if factors > 2:
        return f"{factors} channel groups meet in it"
    for value in node.inputs:
        if value is not None and value.const_value is None:
            dims = shapes.dims(value)
            if dims is None or None in dims:
                return f"unknown dims of '{value.name}'"
    if node.op_type == "Conv":
        group = node.attributes.get("group")
        dims = shapes.dims(node.inputs[0])
        if group is not None and group.value > 1 and (
                factors > 1 or not dims or dims[1] != group.value):
            return "grouped conv (not depthwise)"
    if any(v is not None and v.const_value is not None and v.dtype == ir.DataType.INT64
           and v.const_value.size > 1 for v in node.inputs):
        return "shape-like constant input"
    return ""


# -- the cost model ---------------------------------------------------------------------------


def _interpolate(grids: Sequence[np.ndarray], values: np.ndarray, point: Sequence[float]) -> float:
    """Multilinear interpolation on a grid, clamped to its ends."""
    if not grids:
        return float(values)
    grid, x = grids[0], point[0]
    if len(grid) == 1:
        return _interpolate(grids[1:], values[0], point[1:])
    x = min(max(x, grid[0]), grid[-1])
    i = int(np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2))
    t = (x - grid[i]) / (grid[i + 1] - grid[i])
    low = _interpolate(grids[1:], values[i], point[1:])
    high = _interpolate(grids[1:], values[i + 1], point[1:])
    return (1 - t) * low + t * high


@dataclass
class TableTerm(CostTerm):
    """A node's latency over a grid of kept fractions of its factors, interpolated.

    ``grids[f]`` are ascending fractions ending at 1; ``values`` has one axis per factor.
    ``base`` scales the table (the calibration slope).
    """

    grids: list[np.ndarray] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros(()))

    def value(self, fractions: Sequence[float]) -> float:
        return self.base * _interpolate(self.grids, self.values, fractions)

    def held(self, kept: Sequence[int]) -> CostTerm:
        index = tuple(slice(None) if f in kept else -1 for f in range(len(self.factors)))
        return TableTerm(self.base, [self.factors[f] for f in kept],
                         [self.grids[f] for f in kept], self.values[index])


def monotone(values: np.ndarray) -> np.ndarray:
    """``values`` made non-decreasing along every axis (grids ascend)."""
    out = np.asarray(values, dtype=np.float64)
    for axis in range(out.ndim):
        out = np.maximum.accumulate(out, axis=axis)
    return out


def _grid_widths(size: int, limits: Limits, group: ChannelGroup, points: int) -> list[int]:
    """Kept widths to measure a factor of ``size`` channels at, ascending.

    A whole group takes the widths its limits allow. A concat slice is thinned by the
    group's ranking, to any width down to one channel (every concat input keeps one), so
    its grid spans 1 to its size, on the group's step where the slice holds a few steps.
    """
    if size == group.size:
        allowed = limits.allowed(size, group.index)[::-1]  # ascending
    else:
        step = limits.step(group.index)
        allowed = Limits(1, step if size >= 4 * step else 1).allowed(size)[::-1]
    picks = np.unique(np.round(np.linspace(0, len(allowed) - 1, points)).astype(int))
    return [int(allowed[i]) for i in picks]


def _share(group: ChannelGroup, channels: np.ndarray) -> np.ndarray:
    """``w`` with ``w . keep`` the kept fraction of ``channels`` (a slice or the group)."""
    w = np.zeros(group.size)
    w[channels] = 1.0 / max(len(channels), 1)
    return w


def latency_model(analysis: ChannelAnalysis, specs: Sequence[NodeSpec], limits: Limits,
                  meter: LatencyMeter) -> CostModel:
    """Seconds per run as a cost model over the factors of ``specs`` (uncalibrated)."""
    by_index = {g.index: g for g in analysis.groups}
    requests, grids = [], []
    for spec in specs:
        widths = [_grid_widths(size, limits, by_index[g],
                               GRID_POINTS[min(len(spec.factors), 2) - 1])
                  for g, size in zip(spec.factors, spec.sizes, strict=True)]
        grids.append(widths)
        requests.append((spec, [tuple(p) for p in np.array(np.meshgrid(*widths, indexing="ij"))
                                .reshape(len(widths), -1).T.tolist()]))
    model = CostModel()
    for spec, widths, found in zip(specs, grids, meter.times(requests), strict=True):
        values = np.array([found[tuple(p)] for p in requests[len(model.terms)][1]])
        values = monotone(values.reshape([len(w) for w in widths]))
        fractions = [np.array(w, dtype=np.float64) / s
                     for w, s in zip(widths, spec.sizes, strict=True)]
        model.terms.append(TableTerm(1.0, [(g, _share(by_index[g], c)) for g, c in
                                           zip(spec.factors, spec.channels, strict=True)],
                                     fractions, values))
    return model


def calibrated(model: CostModel, intercept: float, slope: float) -> CostModel:
    """``intercept + slope * model``: the sum of node tables fitted to whole-model times."""
    out = CostModel(intercept + slope * model.constant, unknown=model.unknown)
    for term in model.terms:
        if isinstance(term, TableTerm):
            out.terms.append(TableTerm(term.base * slope, term.factors, term.grids, term.values))
        else:
            out.terms.append(CostTerm(term.base * slope, term.factors))
    return out
