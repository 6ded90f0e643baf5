"""Channel dependency groups: ties, index mappings, frozen reasons, constants and surgery."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.channels import ChannelAnalysis, analyse_channels, format_groups
from onnxopt.channels.surgery import remove_channels
from onnxopt.channels.tie import Role
from onnxopt.channels.values import channel_constants
from onnxopt.ir import from_proto, to_proto
from testmodels import zeroed
from testmodels.graph_builder import GraphBuilder
from testmodels.structures import (
    concat_branches,
    conv_chain,
    flatten_gemm_head,
    inverted_residual,
    residual_blocks,
)
from tests.helpers import assert_same_outputs, random_feeds


def _analyse(proto: onnx.ModelProto) -> ChannelAnalysis:
    return analyse_channels(from_proto(proto))


def _group_of(analysis: ChannelAnalysis, name: str, axis: int = 1):
    for group in analysis.groups:
        for member in group.members:
            if member.value.name == name and member.axis == axis:
                return group, member
    raise AssertionError(f"{name}:{axis} is in no group")


def _producers(group) -> set[str]:
    return {t.node.name for t in group.ties_with_role(Role.PRODUCER)}


def test_residual_add_ties_every_producer_of_the_stream() -> None:
    analysis = _analyse(residual_blocks())
    group, _ = _group_of(analysis, "add0")
    assert group.prunable and group.size == 8
    assert _producers(group) == {"conv0", "conv2"}
    consumers = {t.node.name for t in group.ties_with_role(Role.CONSUMER)}
    assert consumers == {"conv1", "conv3", "conv5"}
    for member in group.members:
        np.testing.assert_array_equal(member.channels, np.arange(8))


def test_graph_input_and_output_groups_are_frozen() -> None:
    analysis = _analyse(conv_chain())
    assert "graph input 'input'" in _group_of(analysis, "input")[0].frozen
    assert "graph output 'logits'" in _group_of(analysis, "logits")[0].frozen


def test_concat_inputs_map_to_offsets_of_the_output() -> None:
    proto = concat_branches()
    analysis = _analyse(proto)
    concat = next(n for n in proto.graph.node if n.op_type == "Concat")
    group, out = _group_of(analysis, concat.output[0])
    offset = 0
    for name in concat.input:
        in_group, member = _group_of(analysis, name)
        assert in_group is group
        np.testing.assert_array_equal(member.channels,
                                      out.channels[offset:offset + member.size])
        offset += member.size
    assert offset == out.size
    assert group.size == 40  # 28 inception channels + 3 dense layers of 4


def test_flatten_maps_each_channel_to_a_block_of_features() -> None:
    analysis = _analyse(flatten_gemm_head())
    group, pooled = _group_of(analysis, "maxpool0")
    _, flat = _group_of(analysis, "flatten0")
    block = flat.size // pooled.size
    assert block == 16
    np.testing.assert_array_equal(flat.channels, np.repeat(pooled.channels, block))
    assert {t.node.name for t in group.ties_with_role(Role.CONSUMER)} == {"gemm0"}


def test_depthwise_conv_ties_its_input_to_its_output() -> None:
    proto = inverted_residual()
    analysis = _analyse(proto)
    dw = next(n for n in proto.graph.node
              if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    group_in, _ = _group_of(analysis, dw.input[0])
    group_out, _ = _group_of(analysis, dw.output[0])
    assert group_in is group_out and group_in.prunable
    roles = {t.tie.role for t in group_in.ties if t.node.name == dw.name}
    assert roles == {Role.THROUGH}


def test_transpose_and_matmul_follow_the_channel_axis() -> None:
    analysis = _analyse(zeroed.index_mappings())
    concat_group, _ = _group_of(analysis, "concat0")
    nhwc_group, member = _group_of(analysis, "transpose0", axis=3)
    assert concat_group is nhwc_group and member.size == 16
    matmul_group, _ = _group_of(analysis, "matmul0", axis=3)
    assert _producers(matmul_group) == {"matmul0"}
    assert matmul_group is _group_of(analysis, "transpose1")[0]
    split_group, sliced = _group_of(analysis, "slice0")
    np.testing.assert_array_equal(sliced.channels, _group_of(analysis, "split.b")[1].channels[2:])
    assert split_group.prunable


@pytest.mark.parametrize(("name", "reason"), [
    ("channel_shuffle", "channel shuffle (Reshape->Transpose->Reshape)"),
    ("custom_domain_op", "custom-domain op custom.ops::ScaledRelu"),
    ("dynamic_channels", "channel count is dynamic"),
    ("graph_output_features", "graph output 'relu1'"),
])
def test_groups_that_cannot_be_handled_are_frozen_with_the_reason(name: str, reason: str) -> None:
    analysis = _analyse(zeroed.REFUSED[name]())
    group, _ = _group_of(analysis, "conv1")
    assert not group.prunable
    assert any(reason in r for r in group.frozen), group.frozen
    assert _group_of(analysis, "conv0")[0].prunable


def _tiny(op: onnx.NodeProto, channels: int = 4) -> onnx.ModelProto:
    """input -> Conv(4) -> ``op`` (reads "c", writes "y") -> Conv(4) -> output."""
    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array(rng.normal(size=(channels, 3, 1, 1)).astype(np.float32), "w0")
    w1 = numpy_helper.from_array(rng.normal(size=(4, channels, 1, 1)).astype(np.float32), "w1")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w0"], ["c"], name="conv0"), op,
         helper.make_node("Conv", ["y", "w1"], ["output"], name="conv1")],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], [w0, w1])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("op", "reason"), [
    (helper.make_node("LRN", ["c"], ["y"], size=3), "LRN is not understood"),
    (helper.make_node("Softmax", ["c"], ["y"], axis=1), "Softmax is not understood"),
    (helper.make_node("Conv", ["c", "wg"], ["y"], group=2), "grouped Conv (group=2)"),
])
def test_ops_that_mix_channels_freeze_the_group(op: onnx.NodeProto, reason: str) -> None:
    proto = _tiny(op)
    if op.op_type == "Conv":
        proto.graph.initializer.append(
            numpy_helper.from_array(np.ones((4, 2, 1, 1), np.float32), "wg"))
    analysis = _analyse(proto)
    group, _ = _group_of(analysis, "c")
    assert not group.prunable
    assert any(reason in r for r in group.frozen), group.frozen


def test_format_groups_lists_members_counts_and_status() -> None:
    text = format_groups(from_proto(zeroed.channel_shuffle()))
    assert text.startswith("6 channel groups, 2 prunable")
    assert "group 0: 8 channels, prunable" in text
    assert "producers: Conv 'conv0'" in text and "tensors: conv0:1 bn0:1 relu0:1" in text
    assert "frozen: channel shuffle (Reshape->Transpose->Reshape)" in text


def test_zeroed_bn_channels_are_constant_zero() -> None:
    proto = zeroed.zero_channels(conv_chain())
    chosen = zeroed.zeroed_filters(conv_chain())["conv0"]
    analysis = _analyse(proto)
    consts = channel_constants(analysis)
    for name in ("conv0", "bn0", "relu0"):
        _, member = _group_of(analysis, name)
        values = consts.member(member)
        np.testing.assert_array_equal(values[chosen], 0.0)
        assert np.isnan(np.delete(values, chosen)).all()


def test_zero_filter_with_bias_is_a_constant_channel() -> None:
    proto, counts = zeroed.constant_channels()
    analysis = _analyse(proto)
    consts = channel_constants(analysis)
    _, member = _group_of(analysis, "relu0")
    bias = numpy_helper.to_array(next(t for t in proto.graph.initializer
                                      if t.name == "conv0.bias"))
    n = counts["conv_fold"]
    np.testing.assert_allclose(consts.member(member)[:n], np.maximum(bias[:n], 0), rtol=1e-6)
    assert np.isnan(consts.member(member)[n:]).all()


def test_a_filter_whose_taps_cancel_is_not_constant() -> None:
    g = GraphBuilder(0, 8, 1)
    weight = np.zeros((2, 3, 3, 3))
    weight[0, 0, 1, 0], weight[0, 0, 1, 2] = 1.0, -1.0  # sums to 0, output is not 0
    proto = g.build(g.classifier(g.relu(g.conv(g.input, 2, 3, weight=weight))), "cancel")
    analysis = _analyse(proto)
    values = channel_constants(analysis).member(_group_of(analysis, "conv0")[1])
    assert np.isnan(values[0]) and values[1] == 0.0


def test_remove_channels_drops_arbitrary_channels_from_every_member() -> None:
    proto = conv_chain()
    model = from_proto(proto)
    analysis = analyse_channels(model)
    group, _ = _group_of(analysis, "conv0")
    removal = remove_channels(model, group, [0, 3])
    assert removal.channels == 2 and group.size == 6
    shapes = {v.name: v.const_value.shape for v in model.graph.initializers.values()}
    assert shapes["conv0.weight"] == (6, 3, 3, 3) and shapes["bn0.scale"] == (6,)
    assert shapes["conv1.weight"] == (16, 6, 3, 3)
    # Equivalent reference: the next conv ignores channels 0 and 3.
    reference = onnx.ModelProto()
    reference.CopyFrom(proto)
    for tensor in reference.graph.initializer:
        if tensor.name == "conv1.weight":
            w = numpy_helper.to_array(tensor).copy()
            w[:, [0, 3]] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    onnx.checker.check_model(to_proto(model), full_check=True)
    assert_same_outputs(reference, model, random_feeds(proto))
    remove_channels(model, group, [0])  # the group stays valid for further removals
    assert model.graph.initializers["conv1.weight"].const_value.shape == (16, 5, 3, 3)


def test_remove_channels_folds_fill_values_into_the_consumer_bias() -> None:
    proto = flatten_gemm_head()
    model = from_proto(proto)
    analysis = analyse_channels(model)
    group, _ = _group_of(analysis, "conv1")
    tie = group.ties_with_role(Role.CONSUMER)[0]
    member = tie.member_at(tie.tie.entries[0].port)
    fill = np.full(member.size, 0.25)
    remove_channels(model, group, [2], fill={member: fill})
    # Reference: channel 2 of the features forced to 0.25 everywhere.
    reference = onnx.ModelProto()
    reference.CopyFrom(proto)
    mask = np.ones((1, 16, 1, 1), np.float32)
    mask[0, 2] = 0.0
    shift = (1.0 - mask) * 0.25
    pool = next(n for n in reference.graph.node if n.op_type == "MaxPool")
    pool.output[0] = "pooled_raw"
    reference.graph.initializer.extend([numpy_helper.from_array(mask, "mask"),
                                        numpy_helper.from_array(shift, "shift")])
    reference.graph.node.extend([helper.make_node("Mul", ["pooled_raw", "mask"], ["masked"]),
                                 helper.make_node("Add", ["masked", "shift"], ["maxpool0"])])
    assert_same_outputs(_toposort(reference), model, random_feeds(proto))


def _toposort(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnx_ir.passes.common import TopologicalSortPass

    model = from_proto(proto)
    TopologicalSortPass()(model)
    return to_proto(model)


def test_remove_channels_refuses_frozen_groups_and_emptying_a_tensor() -> None:
    model = from_proto(conv_chain())
    analysis = analyse_channels(model)
    frozen_group, _ = _group_of(analysis, "input")
    with pytest.raises(ValueError, match="frozen"):
        remove_channels(model, frozen_group, [0])
    group, _ = _group_of(analysis, "conv0")
    with pytest.raises(ValueError, match="without channels"):
        remove_channels(model, group, range(group.size))
