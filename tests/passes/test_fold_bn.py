"""Tests of the ``fold-bn`` pass: structure after the rewrite, numerics, and refusals."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import from_proto, to_proto
from onnxopt.pass_base import get_pass
from testmodels import STRUCTURES
from tests.helpers import apply_pass, assert_same_outputs, op_counts, random_feeds

F = TensorProto.FLOAT


def _fold_bn():
    return get_pass("fold-bn")()


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _vi(name: str, shape: Sequence[int | str], elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
           outputs: Sequence[onnx.ValueInfoProto],
           initializers: Sequence[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs),
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn(x: str, y: str, channels: int, prefix: str, seed: int = 1,
        dtype: type = np.float32, **attrs: object) -> tuple[onnx.NodeProto, list]:
    """A BatchNormalization node with non-trivial random statistics."""
    rng = np.random.default_rng(seed)
    params = {
        "scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(0, 0.5, channels),
        "mean": rng.normal(0, 0.5, channels), "var": rng.uniform(0.2, 2.0, channels),
    }
    inits = [_init(f"{prefix}.{k}", v.astype(dtype)) for k, v in params.items()]
    node = helper.make_node("BatchNormalization", [x, *(f"{prefix}.{k}" for k in params)], [y],
                            epsilon=1e-3, **attrs)
    return node, inits


def _unchanged(model: onnx.ModelProto, out) -> bool:
    """Whether the rewritten model is byte-identical to a plain round trip of ``model``."""
    return to_proto(out).SerializeToString() == to_proto(from_proto(model)).SerializeToString()


def _check_folded(model: onnx.ModelProto, expected: int, feeds: dict | None = None):
    out, result = apply_pass(_fold_bn(), model)
    assert "BatchNormalization" not in op_counts(out)
    assert result.modified and result.stats["folded"] == expected, result.stats
    assert not result.refusals
    assert_same_outputs(model, out, feeds if feeds is not None else random_feeds(model))
    _, again = apply_pass(_fold_bn(), out)
    assert again.modified is False
    return out, result


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structures_have_no_bn_left(name: str) -> None:
    model = STRUCTURES[name]()
    before = op_counts(model)
    out, _ = _check_folded(model, before["BatchNormalization"])
    expected = before.copy()
    del expected["BatchNormalization"]
    assert op_counts(out) == expected
    # No stale weights: every initializer is read.
    proto = to_proto(out)
    read = {i for n in proto.graph.node for i in n.input}
    assert all(init.name in read for init in proto.graph.initializer)


def _conv_bn(op: str = "Conv", group: int = 1, bias: bool = False, cin: int = 4,
             cout: int = 6, dtype: type = np.float32, stride: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if op == "Conv":
        w_shape, out_hw = (cout, cin // group, 3, 3), (8 - 3) // stride + 1
    else:
        w_shape, out_hw = (cin, cout // group, 3, 3), (8 - 1) * stride + 3
    inits = [_init("w", rng.normal(0, 0.3, w_shape).astype(dtype))]
    inputs = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.normal(0, 0.3, cout).astype(dtype)))
        inputs.append("b")
    bn, bn_inits = _bn("c", "y", cout, "bn", dtype=dtype)
    nodes = [helper.make_node(op, inputs, ["c"], group=group, kernel_shape=[3, 3],
                              strides=[stride, stride]), bn]
    return _model(nodes, [_vi("x", [2, cin, 8, 8], elem)],
                  [_vi("y", [2, cout, out_hw, out_hw], elem)], inits + bn_inits)


@pytest.mark.parametrize(("group", "bias", "cin", "cout"), [
    (1, False, 4, 6), (1, True, 4, 6), (2, True, 4, 6), (4, False, 4, 4),
])
def test_conv_bn_folded(group: int, bias: bool, cin: int, cout: int) -> None:
    out, _ = _check_folded(_conv_bn("Conv", group, bias, cin, cout), 1)
    conv = to_proto(out).graph.node[0]
    assert op_counts(out) == {"Conv": 1}
    assert len(conv.input) == 3  # a bias was added when there was none


@pytest.mark.parametrize(("group", "bias", "stride"), [
    (1, False, 1), (1, True, 2), (2, True, 1), (2, False, 2),
])
def test_conv_transpose_bn_folded(group: int, bias: bool, stride: int) -> None:
    out, _ = _check_folded(_conv_bn("ConvTranspose", group, bias, stride=stride), 1)
    assert op_counts(out) == {"ConvTranspose": 1}


def test_float64_gemm_bn_folded() -> None:
    # onnxruntime's CPU Conv has no double kernel; Gemm and BatchNormalization do.
    model = _gemm_bn(1, 1.0, 1.0, (4,), dtype=np.float64)
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 5))}
    out, _ = _check_folded(model, 1, feeds)
    assert {i.data_type for i in to_proto(out).graph.initializer} == {TensorProto.DOUBLE}


def _gemm_bn(trans_b: int, alpha: float, beta: float,
             bias_shape: tuple[int, ...] | None, m: int = 3, k: int = 5,
             n: int = 4, dtype: type = np.float32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [_init("w", rng.normal(0, 0.5, (n, k) if trans_b else (k, n)).astype(dtype))]
    inputs = ["x", "w"]
    if bias_shape is not None:
        inits.append(_init("b", rng.normal(0, 0.5, bias_shape).astype(dtype)))
        inputs.append("b")
    bn, bn_inits = _bn("g", "y", n, "bn", dtype=dtype)
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=alpha, beta=beta)
    return _model([gemm, bn], [_vi("x", [m, k], elem)], [_vi("y", [m, n], elem)],
                  inits + bn_inits)


@pytest.mark.parametrize(("trans_b", "alpha", "beta", "bias_shape"), [
    (1, 1.0, 1.0, (4,)), (0, 1.0, 1.0, (4,)), (1, 0.5, 2.0, (1, 4)), (0, 1.5, 0.3, ()),
    (1, 1.0, 1.0, None), (0, 2.0, -1.0, (1, 1)),
])
def test_gemm_bn_folded(trans_b: int, alpha: float, beta: float,
                        bias_shape: tuple[int, ...] | None) -> None:
    out, _ = _check_folded(_gemm_bn(trans_b, alpha, beta, bias_shape), 1)
    gemm = from_proto(to_proto(out)).graph.node(0)
    assert gemm.attributes.get_float("beta") == 1.0
    assert gemm.attributes.get_float("alpha", 1.0) == pytest.approx(alpha)


def test_bn_graph_output_keeps_name_and_chain_folds() -> None:
    """Conv -> BN -> BN where the last BN's output is the graph output."""
    model = _conv_bn("Conv")
    bn2, bn2_inits = _bn("y", "z", 6, "bn2", seed=7)
    graph = model.graph
    graph.node.append(bn2)
    graph.initializer.extend(bn2_inits)
    graph.output[0].name = "z"
    onnx.checker.check_model(model, full_check=True)
    out, _ = _check_folded(model, 2)
    proto = to_proto(out)
    assert [o.name for o in proto.graph.output] == ["z"]
    assert proto.graph.node[0].output[0] == "z"


def test_standalone_bn_left_alone() -> None:
    bn, inits = _bn("r", "y", 3, "bn")
    model = _model([helper.make_node("Relu", ["x"], ["r"]), bn],
                   [_vi("x", [2, 3, 4, 4])], [_vi("y", [2, 3, 4, 4])], inits)
    out, result = apply_pass(_fold_bn(), model)
    assert result.modified is False and not result.refusals
    assert result.stats == {"folded": 0, "standalone": 1, "refused": 0, "in_subgraphs": 0}
    assert _unchanged(model, out)


# -- refusals ---------------------------------------------------------------------------------


def _assert_refused(model: onnx.ModelProto, reason: str, count: int = 1,
                    feeds: dict | None = None) -> None:
    out, result = apply_pass(_fold_bn(), model)
    assert result.modified is False
    assert _unchanged(model, out)
    assert op_counts(out) == op_counts(model)
    assert result.stats["refused"] == count == len(result.refusals)
    assert all(reason in r.reason for r in result.refusals), result.refusals
    assert all(r.where.startswith("BatchNormalization") for r in result.refusals)
    assert_same_outputs(model, out, feeds if feeds is not None else random_feeds(model))


def test_refuses_shared_weight() -> None:
    bn0, i0 = _bn("c0", "y0", 6, "bn0")
    bn1, i1 = _bn("c1", "y1", 6, "bn1", seed=2)
    w = np.random.default_rng(0).normal(0, 0.3, (6, 4, 1, 1)).astype(np.float32)
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c0"]), bn0,
         helper.make_node("Conv", ["x", "w"], ["c1"]), bn1],
        [_vi("x", [2, 4, 5, 5])], [_vi("y0", [2, 6, 5, 5]), _vi("y1", [2, 6, 5, 5])],
        [_init("w", w), *i0, *i1])
    _assert_refused(model, "weight of Conv", count=2)
    _assert_refused(model, "is shared with another node", count=2)


def test_refuses_weight_fed_as_graph_input() -> None:
    model = _conv_bn("Conv")
    model.graph.input.append(_vi("w", [6, 4, 3, 3]))  # overridable initializer (old-IR style)
    onnx.checker.check_model(model, full_check=True)
    _assert_refused(model, "weight of Conv -> c is not a constant: 'w' is a graph input "
                    "(an initializer that callers may override)")

    del model.graph.initializer[0]  # now a genuine input
    feeds = {**random_feeds(model), "w": np.ones((6, 4, 3, 3), np.float32)}
    _assert_refused(model, "weight of Conv -> c is not a constant: 'w' is a graph input",
                    feeds=feeds)


def test_refuses_conv_output_read_twice() -> None:
    model = _conv_bn("Conv")
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(_vi("r", [2, 6, 6, 6]))
    _assert_refused(model, "output has other readers or is a graph output")


def test_refuses_bn_param_graph_input() -> None:
    model = _conv_bn("Conv")
    mean = next(i for i in model.graph.initializer if i.name == "bn.mean")
    model.graph.initializer.remove(mean)
    model.graph.input.append(_vi("bn.mean", [6]))
    feeds = {**random_feeds(model), "bn.mean": np.zeros(6, np.float32)}
    _assert_refused(model, "BatchNormalization mean is not a constant: 'bn.mean' is a graph "
                    "input", feeds=feeds)


def test_refuses_gemm_bias_varying_over_rows() -> None:
    _assert_refused(_gemm_bn(1, 1.0, 1.0, (3, 4)), "not per output feature")


def test_refuses_training_mode() -> None:
    model = _conv_bn("Conv")
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    out, result = apply_pass(_fold_bn(), model)
    assert result.modified is False and _unchanged(model, out)
    assert [r.reason for r in result.refusals] == ["BatchNormalization is in training mode"]


# -- If/Loop bodies ---------------------------------------------------------------------------


def _if_conv_bn(shared_weight: bool) -> onnx.ModelProto:
    """If whose branches hold Conv+BN; weights and BN parameters partly from the outer scope.

    then: ``BN_then(Conv(x, w_outer))`` with its BN parameters in the branch.
    else: ``Relu(BN_else(Conv(x, w_else)))`` with its BN parameters in the main graph;
    ``w_else`` is a branch initializer, or ``w_outer`` itself when ``shared_weight``.
    """
    rng = np.random.default_rng(5)
    w_outer = _init("w_outer", rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32))
    bn_then, then_inits = _bn("c_then", "t", 6, "bn_then", seed=2)
    bn_else, else_params = _bn("c_else", "e0", 6, "bn_else", seed=3)
    else_weight = "w_outer" if shared_weight else "w_else"
    else_inits = [] if shared_weight else [
        _init("w_else", rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32))]
    out_shape = [2, 6, 6, 6]
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_outer"], ["c_then"], kernel_shape=[3, 3]), bn_then],
        "then", [], [_vi("t", out_shape)], initializer=then_inits)
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", else_weight], ["c_else"], kernel_shape=[3, 3]),
         bn_else, helper.make_node("Relu", ["e0"], ["e"])],
        "else", [], [_vi("e", out_shape)], initializer=else_inits)
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                            else_branch=else_branch)
    return _model([node], [_vi("x", [2, 4, 8, 8]), _vi("cond", [], TensorProto.BOOL)],
                  [_vi("y", out_shape)], [w_outer, *else_params])


def _all_ops(model) -> Counter:
    proto = to_proto(model) if not isinstance(model, onnx.ModelProto) else model
    counts: Counter = Counter()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            counts[node.op_type] += 1
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    return counts


def _if_feeds(cond: bool) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    return {"x": x, "cond": np.array(cond)}


def test_bn_in_if_branches_folded_with_outer_scope_weight() -> None:
    model = _if_conv_bn(shared_weight=False)
    out, result = apply_pass(_fold_bn(), model)
    assert result.stats == {"folded": 2, "standalone": 0, "refused": 0, "in_subgraphs": 2}
    assert _all_ops(out) == {"If": 1, "Conv": 2, "Relu": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, _if_feeds(cond))
    proto = to_proto(out)
    # The outer weight and the outer BN parameters had no other reader: dropped.
    assert [i.name for i in proto.graph.initializer] == []
    branches = {a.name: a.g for a in proto.graph.node[0].attribute}
    assert sorted(i.name for i in branches["then_branch"].initializer) == [
        "w_outer.bn_bias", "w_outer.bn_weight"]
    _, again = apply_pass(_fold_bn(), out)
    assert again.modified is False


def test_in_subgraphs_counts_only_the_folds_inside_bodies() -> None:
    _, result = apply_pass(_fold_bn(), _conv_bn())
    assert result.stats["folded"] == 1 and result.stats["in_subgraphs"] == 0
    # A main-graph Conv+BN in front of the If whose two branches fold too.
    model = _if_conv_bn(shared_weight=False)
    bn, bn_inits = _bn("c_main", "x", 4, "bn_main", seed=4)
    weight = np.random.default_rng(7).normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x0", "w_main"], ["c_main"], kernel_shape=[1, 1]), bn,
             *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.input[0].name = "x0"
    model.graph.initializer.extend([_init("w_main", weight), *bn_inits])
    onnx.checker.check_model(model, full_check=True)
    out, result = apply_pass(_fold_bn(), model)
    assert result.stats == {"folded": 3, "standalone": 0, "refused": 0, "in_subgraphs": 2}
    assert _all_ops(out) == {"If": 1, "Conv": 3, "Relu": 1}
    for cond in (True, False):
        feeds = _if_feeds(cond)
        assert_same_outputs(model, out, {"x0": feeds["x"], "cond": feeds["cond"]})


def test_bn_in_if_branches_refused_when_outer_weight_is_shared() -> None:
    model = _if_conv_bn(shared_weight=True)
    out, result = apply_pass(_fold_bn(), model)
    assert result.modified is False and _unchanged(model, out)
    assert result.stats["refused"] == 2
    assert all("is shared with another node" in r.reason for r in result.refusals)
    for cond in (True, False):
        assert_same_outputs(model, out, _if_feeds(cond))


def test_bn_reading_an_outer_scope_conv_is_refused() -> None:
    rng = np.random.default_rng(0)
    bn, inits = _bn("c", "t", 6, "bn")
    then_branch = helper.make_graph([bn], "then", [], [_vi("t", [2, 6, 6, 6])])
    else_branch = helper.make_graph([helper.make_node("Relu", ["c"], ["e"])], "else", [],
                                    [_vi("e", [2, 6, 6, 6])])
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                          else_branch=else_branch)],
        [_vi("x", [2, 4, 8, 8]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [2, 6, 6, 6])],
        [_init("w", rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)), *inits])
    out, result = apply_pass(_fold_bn(), model)
    assert result.modified is False and _unchanged(model, out)
    assert [r.reason for r in result.refusals] == ["Conv -> c is in an outer scope"]


def test_cleanup_and_fold_bn_pipeline_on_if_model() -> None:
    from onnxopt.api import optimize

    model = _if_conv_bn(shared_weight=False)
    for cond in (True, False):
        result, report = optimize(model, "cleanup,fold-bn", eval=[_if_feeds(cond)])
        assert [r.status for r in report.records] == ["unchanged", "kept"], report.records
        assert _all_ops(result) == {"If": 1, "Conv": 2, "Relu": 1}
        assert_same_outputs(model, result, _if_feeds(cond))
