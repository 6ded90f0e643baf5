"""Cost analysis: params and MACs match hand counts, at concrete shapes, never negative."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from onnxopt.cli import main
from onnxopt.cost import infer_shapes, model_cost, node_macs
from onnxopt.model_io import load
from testmodels.dynamic import dynamic_hw_macs, dynamic_hw_net, with_input_dims


def _hand_count() -> tuple[int, int]:
    """Params and MACs of digits_resnet from its architecture (see testmodels/README.md).

    Stem conv 1->16 at 32x32; stage 1: one basic block at 16 ch, 32x32; stages 2 and 3:
    two basic blocks each at 32 ch 16x16 and 64 ch 8x8, the first with a stride-2 3x3
    and a 1x1 stride-2 downsample; GlobalAveragePool; Gemm 64->10.
    """
    def conv(cin, cout, k, hw):
        return cin * cout * k * k, hw * hw * cout * cin * k * k

    convs = [conv(1, 16, 3, 32), conv(16, 16, 3, 32), conv(16, 16, 3, 32)]
    for cin, cout, hw in ((16, 32, 16), (32, 64, 8)):
        convs += [conv(cin, cout, 3, hw), conv(cout, cout, 3, hw), conv(cin, cout, 1, hw),
                  conv(cout, cout, 3, hw), conv(cout, cout, 3, hw)]
    bn_channels = [(16, 32)] * 3 + [(32, 16)] * 5 + [(64, 8)] * 5
    params = sum(p for p, _ in convs) + sum(4 * c for c, _ in bn_channels) + 64 * 10 + 10
    macs = sum(m for _, m in convs) + 64 * 10
    macs += sum(c * hw * hw for c, hw in bn_channels)          # BatchNormalization
    macs += 3 * 16 * 32 * 32 + 4 * 32 * 16 * 16 + 4 * 64 * 8 * 8  # Relu
    macs += 16 * 32 * 32 + 2 * 32 * 16 * 16 + 2 * 64 * 8 * 8      # residual Add
    macs += 64 * 8 * 8                                            # GlobalAveragePool
    return params, macs


def test_params_and_macs_match_hand_count(digits_model):
    cost = model_cost(infer_shapes(load(digits_model)))
    params, macs = _hand_count()
    assert cost.params == params == 171_354
    assert cost.macs == macs
    assert cost.op_histogram["Conv"] == 13 and cost.op_histogram["BatchNormalization"] == 13


def test_info_prints_the_hand_counted_numbers(digits_model, capsys):
    assert main(["info", str(digits_model)]) == 0
    out = capsys.readouterr().out
    params, macs = _hand_count()
    assert f"{params:,}" in out and f"{macs:,}" in out
    assert "Conv 13" in out


def _single_node_macs(node: onnx.NodeProto, inputs, output, inits=()) -> int:
    graph = onnx.helper.make_graph([node], "g", inputs, [output], list(inits))
    model = infer_shapes(load(onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)])))
    return node_macs(next(iter(model.graph)))


def test_grouped_dilated_strided_conv_and_conv_transpose():
    import numpy as np
    from onnx import TensorProto as T
    from onnx.helper import make_node
    from onnx.helper import make_tensor_value_info as vi
    from onnx.numpy_helper import from_array

    x = vi("x", T.FLOAT, [1, 8, 10, 10])
    y = vi("y", T.FLOAT, None)
    w = from_array(np.zeros((16, 4, 3, 3), np.float32), "w")  # groups=2
    node = make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 2], dilations=[2, 2],
                     pads=[2, 2, 2, 2])
    # output 16 x 5 x 5; each output sums 4 inputs x 9 taps
    assert _single_node_macs(node, [x], y, [w]) == 16 * 5 * 5 * 4 * 9
    wt = from_array(np.zeros((8, 3, 2, 2), np.float32), "w")  # ConvTranspose: [Cin, Cout, k, k]
    node = make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    assert _single_node_macs(node, [x], y, [wt]) == 8 * 10 * 10 * 3 * 4
    a = vi("x", T.FLOAT, [4, 6])
    b = from_array(np.zeros((5, 6), np.float32), "w")
    assert _single_node_macs(make_node("Gemm", ["x", "w"], ["y"], transB=1), [a], y, [b]) \
        == 4 * 5 * 6
    m = vi("x", T.FLOAT, [2, 3, 4, 6])
    mb = from_array(np.zeros((6, 7), np.float32), "w")
    assert _single_node_macs(make_node("MatMul", ["x", "w"], ["y"]), [m], y, [mb]) \
        == 2 * 3 * 4 * 7 * 6
    p = vi("x", T.FLOAT, [1, 8, 10, 10])
    pool = make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    assert _single_node_macs(pool, [p], y) == 8 * 5 * 5 * 4


# -- concrete shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["N", -1])
def test_dynamic_hw_macs_with_input_shape_match_hand_count(batch) -> None:
    model = load(dynamic_hw_net(batch=batch))
    for shape in ((1, 3, 48, 64), (8, 3, 32, 320)):
        cost = model_cost(model, {"x": shape})
        assert cost.macs == dynamic_hw_macs(shape[2], shape[3])  # per sample: batch counts 1
        assert cost.costed_at == f"x:1x3x{shape[2]}x{shape[3]}"
    # the same count as a copy of the model with every dim static, costed on its IR shapes
    static = infer_shapes(load(with_input_dims(dynamic_hw_net(batch=batch), [1, 3, 48, 64])))
    on_ir = [node_macs(n) for n in static.graph]
    assert None in on_ir  # ONNX inference alone leaves the sequence length unknown
    assert model_cost(static).macs == dynamic_hw_macs(48, 64)


@pytest.mark.parametrize("batch", ["N", -1])
def test_unknown_dims_never_give_negative_or_guessed_macs(batch) -> None:
    model = infer_shapes(load(dynamic_hw_net(batch=batch)))
    if batch == -1:  # the -1 dims reach the IR's shapes, as in exported OCR models
        assert any(d == -1 for n in model.graph for v in n.outputs for d in v.shape or ())
    cost = model_cost(model)
    assert cost.macs is None and "--input-shape x:1x3xHxW" in cost.macs_unknown
    assert all(m is None or m >= 0 for m in cost.per_node.values())
    assert cost.per_node["conv0"] is None and cost.per_node["head"] is None
    assert cost.macs_counted == 0  # every node here needs H or W
    assert all(node_macs(n) is None or node_macs(n) >= 0 for n in model.graph)


def test_reshape_to_minus_one_with_a_dynamic_batch_is_counted_per_sample() -> None:
    from onnx import TensorProto as T
    from onnx.helper import make_graph, make_model, make_node, make_opsetid
    from onnx.helper import make_tensor_value_info as vi
    from onnx.numpy_helper import from_array

    graph = make_graph(
        [make_node("GlobalAveragePool", ["x"], ["p"]),
         make_node("Reshape", ["p", "shape"], ["f"]),
         make_node("MatMul", ["f", "w"], ["y"])], "g",
        [vi("x", T.FLOAT, [-1, 6, 5, 7])], [vi("y", T.FLOAT, [-1, 4])],
        [from_array(np.array([-1, 6]), "shape"), from_array(np.zeros((6, 4), np.float32), "w")])
    model = infer_shapes(load(make_model(graph, opset_imports=[make_opsetid("", 17)])))
    cost = model_cost(model)
    assert cost.macs == 6 * 5 * 7 + 6 * 4


def test_info_with_and_without_input_shape(tmp_path, capsys) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_hw_net(batch=-1), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MACs      unknown: input x [1, 3, ?, ?] has unknown dims; give --input-shape " \
           "x:1x3xHxW" in out
    assert "at least 0 (0) per sample" in out
    assert not re.search(r"-\d", out.split("ops ")[0].split("opsets")[1])  # nothing negative
    assert main(["info", str(path), "--input-shape", "x:1x3x48x64"]) == 0
    out = capsys.readouterr().out
    macs = dynamic_hw_macs(48, 64)
    assert f"MACs      {macs:,} ({macs / 1e6:.2f}M) per sample at x:1x3x48x64" in out
    assert "costliest nodes" in out and "unknown" not in out
    assert main(["info", str(path), "--input-shape", "y:1x3x48x64"]) == 2
    assert "no input 'y'" in capsys.readouterr().err
