"""Cost analysis: params and MACs of the trained model match a hand count."""

from __future__ import annotations

import onnx

from onnxopt.cli import main
from onnxopt.cost import infer_shapes, model_cost, node_macs
from onnxopt.model_io import load


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
