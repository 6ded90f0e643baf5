"""Tests of cut points (dominators of the outputs) and of splitting a model into stages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cost import infer_shapes, model_cost
from onnxopt.errors import UserError
from onnxopt.ir import to_proto
from onnxopt.model_io import load
from onnxopt.passes.early_exit.cuts import (
    CutError,
    all_cut_points,
    choose_cuts,
    find_cut_points,
    require_cut_points,
    resolve_cuts,
    split_model,
    stage_nodes,
)
from onnxopt.session import make_session
from testmodels import STRUCTURES
from tests.helpers import random_feeds

F = TensorProto.FLOAT
#: Without graph rewrites onnxruntime runs the same arithmetic in the stages as in the model.
_EXACT = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
           outputs: Sequence[onnx.ValueInfoProto],
           initializers: Sequence[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs),
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weight(name: str, *shape: int, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)


def _run_chain(stages, feeds: dict[str, np.ndarray], level) -> list[np.ndarray]:
    current = dict(feeds)
    outputs: list[np.ndarray] = []
    for stage in stages:
        session = make_session(stage, graph_optimization=level)
        names = [i.name for i in session.get_inputs()]
        outputs = session.run(None, {k: current[k] for k in names})
        current = {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}
    return outputs


def _shaped(proto: onnx.ModelProto):
    return infer_shapes(load(proto))


def test_digits_cut_points_are_block_boundaries(digits_model) -> None:
    model = infer_shapes(load(digits_model))
    points = find_cut_points(model)
    names = [p.name for p in points]
    for inside in ("relu1", "bn2", "relu3", "conv5", "relu5"):  # inside residual blocks
        assert inside not in names
    assert {"relu0", "relu2", "relu4", "relu6", "relu8"} <= set(names)
    assert [p.index for p in points] == sorted(p.index for p in points)
    fractions = [p.macs_before for p in points]
    assert fractions == sorted(fractions)
    assert points[0].total_macs == model_cost(model).macs
    assert [c.name for c in choose_cuts(points)] == ["relu2", "relu4", "relu8"]
    assert 0.2 < next(p for p in points if p.name == "relu2").fraction < 0.25


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_split_reproduces_outputs_exactly(name: str) -> None:
    proto = STRUCTURES[name]()
    model = _shaped(proto)
    points = find_cut_points(model)
    assert points, f"{name} should have a cut point"
    cuts = [c.name for c in choose_cuts(points)]
    stages = split_model(model, cuts)
    assert len(stages) == len(cuts) + 1
    total_nodes = 0
    for stage in stages:
        stage_proto = to_proto(stage)
        onnx.checker.check_model(stage_proto, full_check=True)
        used = {i for n in stage_proto.graph.node for i in n.input}
        assert all(init.name in used for init in stage_proto.graph.initializer)
        total_nodes += len(stage_proto.graph.node)
    assert total_nodes == len(proto.graph.node)
    assert [i.name for i in to_proto(stages[0]).graph.input] == ["input"]
    assert [o.name for o in to_proto(stages[-1]).graph.output] == ["logits"]
    feeds = random_feeds(proto, batch=3)
    reference = make_session(proto, graph_optimization=_EXACT).run(None, feeds)
    staged = _run_chain(stages, feeds, _EXACT)
    assert np.array_equal(reference[0], staged[0])
    # With onnxruntime's fusions and layout changes, which differ at stage borders: rounding.
    full = make_session(proto).run(None, feeds)[0]
    optimized = _run_chain(stages, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0]
    np.testing.assert_allclose(optimized, full, rtol=1e-5, atol=1e-5 * float(np.abs(full).max()))


def test_split_at_every_cut_point() -> None:
    proto = STRUCTURES["residual_blocks"]()
    model = _shaped(proto)
    cuts = [p.name for p in all_cut_points(model)]
    stages = split_model(model, cuts)
    feeds = random_feeds(proto)
    expected = make_session(proto, graph_optimization=_EXACT).run(None, feeds)[0]
    assert np.array_equal(_run_chain(stages, feeds, _EXACT)[0], expected)
    assert sum(len(s) for s in stage_nodes(model.graph, cuts)) == len(proto.graph.node)


def test_two_inputs_merge_late() -> None:
    nodes = [
        helper.make_node("Conv", ["a", "wa"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "wb"], ["cb"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ca", "cb"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["y"]),
    ]
    proto = _model(nodes, [helper.make_tensor_value_info(n, F, ["N", 2, 6, 6]) for n in "ab"],
                   [helper.make_tensor_value_info("y", F, ["N", 4, 6, 6])],
                   [_weight("wa", 3, 2, 3, 3), _weight("wb", 3, 2, 3, 3, seed=1),
                    _weight("wc", 4, 3, 1, 1, seed=2)])
    model = _shaped(proto)
    assert [p.name for p in find_cut_points(model)] == ["s", "r"]
    stages = split_model(model, ["r"])
    assert sorted(i.name for i in to_proto(stages[0]).graph.input) == ["a", "b"]
    feeds = random_feeds(proto)
    expected = make_session(proto, graph_optimization=_EXACT).run(None, feeds)[0]
    assert np.array_equal(_run_chain(stages, feeds, _EXACT)[0], expected)


def test_values_captured_by_a_subgraph_block_cuts() -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["z2", "y"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", F, [2, 3, 5, 5])])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["z2"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", F, [2, 3, 5, 5])])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"]),
        helper.make_node("Conv", ["z", "w2"], ["z2"], pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["out"], then_branch=then_graph,
                         else_branch=else_graph),
        helper.make_node("Relu", ["out"], ["final"]),
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3, 5, 5])],
                   [helper.make_tensor_value_info("final", F, [2, 3, 5, 5])],
                   [_weight("w1", 3, 3, 3, 3), _weight("w2", 3, 3, 3, 3, seed=1), cond])
    model = _shaped(proto)
    names = [p.name for p in all_cut_points(model)]
    assert names == ["y", "out"]  # the If reads y from the outer scope, bypassing z and z2
    assert [p.name for p in find_cut_points(model)] == ["y"]  # no layer after "out"
    stages = split_model(model, ["y"])
    feeds = random_feeds(proto)
    expected = make_session(proto, graph_optimization=_EXACT).run(None, feeds)[0]
    assert np.array_equal(_run_chain(stages, feeds, _EXACT)[0], expected)


def _single_layer(op: str) -> onnx.ModelProto:
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
                 helper.make_node("Relu", ["h"], ["y"])]
        return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 8])],
                      [helper.make_tensor_value_info("y", F, ["N", 4])], [_weight("w", 4, 8)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", F, ["N", 4])], [_weight("w", 4, 3, 3, 3)])


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_single_layer_net_has_no_valid_cut(op: str) -> None:
    model = _shaped(_single_layer(op))
    assert all_cut_points(model)  # dominators exist, but no layer on both sides
    assert find_cut_points(model) == []
    with pytest.raises(CutError, match="no valid cut point") as info:
        require_cut_points(model)
    assert isinstance(info.value, UserError)
    assert choose_cuts([]) == []


def test_resolve_cuts_checks_names(digits_model) -> None:
    points = find_cut_points(infer_shapes(load(digits_model)))
    assert [p.name for p in resolve_cuts(points, ["relu8", "relu2"])] == ["relu2", "relu8"]
    with pytest.raises(CutError, match="'relu3' is not a valid cut point; valid cut points: "):
        resolve_cuts(points, ["relu3"])
    with pytest.raises(CutError, match="named twice"):
        resolve_cuts(points, ["relu2", "relu2"])


def test_split_model_rejects_bad_cuts(digits_model) -> None:
    model = infer_shapes(load(digits_model))
    with pytest.raises(CutError, match="not a cut point"):
        split_model(model, ["relu3"])
    with pytest.raises(CutError, match="execution order"):
        split_model(model, ["relu4", "relu2"])


def test_stage_initializers_keep_the_model_order(digits_model) -> None:
    model = infer_shapes(load(digits_model))
    order = list(model.graph.initializers)
    for stage in split_model(model, ["relu2", "relu4", "relu8"]):
        names = list(stage.graph.initializers)
        assert names and names == sorted(names, key=order.index)
