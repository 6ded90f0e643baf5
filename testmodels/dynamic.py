"""Models with dynamic spatial dims as OCR exporters write them: symbolic or -1 dims, shape math."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from testmodels.graph_builder import IR_VERSION, OPSET


def with_input_dims(model: onnx.ModelProto, dims: Sequence[int | str]) -> onnx.ModelProto:
    """A copy of ``model`` whose first input has ``dims`` (ints, or names for symbolic dims).

    The first output's leading dim follows the input's. Value infos are dropped, as they
    would hold the old dims.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    _set_dims(copy.graph.input[0], dims)
    out = copy.graph.output[0].type.tensor_type.shape.dim
    if out:
        _set_dim(out[0], dims[0])
    return copy


def _set_dims(value: onnx.ValueInfoProto, dims: Sequence[int | str]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        _set_dim(shape.dim.add(), d)


def _set_dim(dim: onnx.TensorShapeProto.Dimension, d: int | str) -> None:
    if isinstance(d, str):
        dim.dim_param = d
    else:
        dim.dim_value = d


def dynamic_hw_net(*, seed: int = 0, width: int = 8, batch: int | str = "N",
                   classes: int = 10) -> onnx.ModelProto:
    """A text-recognition-like net on input ``x`` ``[batch, 3, "H", "W"]`` (H, W even).

    Conv 3x3 (3 -> w), Relu; Conv 3x3 stride 2 (w -> 2w), Relu; grouped Conv 3x3 (2w -> 2w,
    2 groups), Relu; then a sequence head: the features are reshaped to ``[N, 2w, T]``
    (``T = H/2 * W/2``) by a target computed as paddle2onnx does, ``Concat(Cast(Slice(
    Cast(Shape(f), int32), 0, 2), int64), ReduceProd(Slice(Shape(f), 2, 4)))``, transposed
    to ``[N, T, 2w]`` and mapped to ``classes`` by MatMul. ONNX's own data propagation does
    not resolve that target. ``batch=-1`` writes the ``-1`` dims some exporters leave.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def conv(x: str, cin: int, cout: int, stride: int = 1, group: int = 1) -> str:
        name = f"conv{len([n for n in nodes if n.op_type == 'Conv'])}"
        weight = rng.normal(0.0, np.sqrt(2.0 / (cin // group * 9)), (cout, cin // group, 3, 3))
        nodes.append(helper.make_node(
            "Conv", [x, const(f"{name}.weight", weight.astype(np.float32))], [name], name=name,
            kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1], group=group))
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    w = width
    f = conv(conv(conv("x", 3, w), w, 2 * w, stride=2), 2 * w, 2 * w, group=2)
    nodes += [
        helper.make_node("Shape", [f], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["shape32", const("s0", np.array([0], np.int32)),
                                   const("s2", np.array([2], np.int32))], ["nc32"]),
        helper.make_node("Cast", ["nc32"], ["nc"], to=TensorProto.INT64),
        helper.make_node("Slice", ["shape", const("t2", np.array([2])),
                                   const("t4", np.array([4]))], ["hw"]),
        helper.make_node("ReduceProd", ["hw"], ["t"], keepdims=1),
        helper.make_node("Concat", ["nc", "t"], ["target"], axis=0),
        helper.make_node("Reshape", [f, "target"], ["seq"]),
        helper.make_node("Transpose", ["seq"], ["seq_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["seq_t", const(
            "head.weight", rng.normal(0.0, 0.3, (2 * w, classes)).astype(np.float32))],
            ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_hw_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "T", classes])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="testmodels")
    model.ir_version = IR_VERSION
    return model


def dynamic_hw_macs(h: int, w: int, width: int = 8, classes: int = 10) -> int:
    """MACs per sample of :func:`dynamic_hw_net` at ``H x W``, counted by hand.

    Conv: ``C_out * H_out * W_out * C_in / groups * k_h * k_w``; Relu: its output size;
    MatMul ``[T, 2w] x [2w, classes]``: ``T * classes * 2w``.
    """
    h2, w2 = h // 2, w // 2
    conv1 = width * h * w * 3 * 9
    conv2 = 2 * width * h2 * w2 * width * 9
    conv3 = 2 * width * h2 * w2 * (2 * width // 2) * 9
    relus = width * h * w + 2 * (2 * width * h2 * w2)
    head = h2 * w2 * classes * 2 * width
    return conv1 + conv2 + conv3 + relus + head
