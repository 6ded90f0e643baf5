"""Concrete shapes for costing: input dims from --input-shape or data, shape chains evaluated."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt.data import from_arrays
from onnxopt.errors import UserError
from onnxopt.ir import from_proto, to_proto
from onnxopt.session import run_model
from onnxopt.shapes import concrete_shapes, resolve_input_shapes
from testmodels.dynamic import dynamic_hw_net, with_input_dims


def _value_dims(model: onnx.ModelProto, name: str) -> tuple | None:
    for value in model.graph.value_info:
        if value.name == name:
            return tuple(d.dim_value if d.HasField("dim_value") else None
                         for d in value.type.tensor_type.shape.dim)
    return None


def test_exporter_shape_chain_is_evaluated_where_onnx_inference_stops() -> None:
    proto = dynamic_hw_net()
    fixed = onnx.shape_inference.infer_shapes(with_input_dims(proto, [1, 3, 48, 64]),
                                              data_prop=True)
    assert _value_dims(fixed, "seq_t") == (1, None, 16)  # ONNX alone leaves T unknown
    table = concrete_shapes(from_proto(proto), {"x": (1, 3, 48, 64)})
    (real,) = run_model(proto, {"x": np.zeros((1, 3, 48, 64), np.float32)})
    model = from_proto(proto)
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert table.dims(values["seq_t"]) == (1, 24 * 32, 16)
    assert table.dims(values["logits"]) == real.shape == (1, 768, 10)
    assert not table.unknown_inputs() and table.costed_at() == "x:1x3x48x64"


@pytest.mark.parametrize("batch", ["N", -1])
def test_a_dynamic_leading_axis_is_costed_at_one(batch) -> None:
    model = from_proto(dynamic_hw_net(batch=batch))
    assert resolve_input_shapes(model, {"x": (8, 3, 48, 64)}) == {"x": (1, 3, 48, 64)}
    assert resolve_input_shapes(model) == {}  # H and W stay unknown
    table = concrete_shapes(model)
    assert table.inputs == {"x": (1, 3, None, None)}
    assert "--input-shape x:1x3xHxW" in table.why_unknown("Conv 'conv0'")


def test_the_batch_axis_is_where_the_feeds_find_it() -> None:
    """A recurrent state ``[2, batch, 128]`` is costed at batch 1 on its axis 1."""
    from onnx import TensorProto as T
    from onnx.helper import make_graph, make_model, make_node, make_opsetid
    from onnx.helper import make_tensor_value_info as vi

    graph = make_graph([make_node("Identity", ["state"], ["y"])], "g",
                       [vi("x", T.FLOAT, ["batch", 576]), vi("state", T.FLOAT, [2, "batch", 128])],
                       [vi("y", T.FLOAT, None)])
    model = from_proto(make_model(graph, opset_imports=[make_opsetid("", 17)]))
    assert resolve_input_shapes(model) == {"x": (1, 576), "state": (2, 1, 128)}
    assert resolve_input_shapes(model, {"state": (2, 8, 128)})["state"] == (2, 1, 128)


def test_shapes_come_from_the_data_when_not_given() -> None:
    model = from_proto(dynamic_hw_net())
    data = from_arrays({"x": np.zeros((5, 3, 32, 40), np.float32)}, "arrays")
    assert resolve_input_shapes(model, None, (None, data)) == {"x": (1, 3, 32, 40)}
    assert resolve_input_shapes(model, {"x": (2, 3, 16, 16)}, (data,)) == {"x": (1, 3, 16, 16)}
    wrong_rank = from_arrays({"x": np.zeros((5, 3, 32), np.float32)}, "arrays")
    assert resolve_input_shapes(model, None, (wrong_rank,)) == {}


@pytest.mark.parametrize(("shapes", "message"), [
    ({"y": (1, 3, 8, 8)}, "no input 'y'"),
    ({"x": (1, 3, 8)}, "has rank 3"),
    ({"x": (1, 4, 8, 8)}, "axis 1 is fixed"),
])
def test_input_shapes_that_do_not_fit_are_user_errors(shapes, message) -> None:
    with pytest.raises(UserError, match=message):
        resolve_input_shapes(from_proto(dynamic_hw_net()), shapes)


def test_the_model_is_not_changed() -> None:
    model = from_proto(dynamic_hw_net(batch=-1))
    before = to_proto(model).SerializeToString()
    concrete_shapes(model, {"x": (1, 3, 48, 64)})
    assert to_proto(model).SerializeToString() == before
