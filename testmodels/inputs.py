"""Models whose inputs are not one batched image: recurrent states, scalars, sequences,
optionals, and ``ai.onnx.ml`` maps."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Sample rates the voice-activity-like model accepts (any other value fails at run time).
SAMPLE_RATES = {16000: 1.0, 8000: 0.5}


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _gain_nodes(rates: list[tuple[int, float]], depth: int = 0) -> list[onnx.NodeProto]:
    """Nodes computing ``gain{depth} = table[sr]`` as nested Ifs; an unknown rate fails."""
    out = f"gain{depth}"
    if not rates:  # a Gather out of bounds: onnxruntime refuses to run
        return [_const(f"one{depth}", np.ones(1, np.float32)),
                _const(f"oob{depth}", np.array([5], np.int64)),
                helper.make_node("Gather", [f"one{depth}", f"oob{depth}"], [out])]
    (rate, gain), rest = rates[0], rates[1:]

    def branch(name: str, nodes: list[onnx.NodeProto], result: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            result, TensorProto.FLOAT, [1])])

    return [_const(f"rate{depth}", np.array(rate, np.int64)),
            helper.make_node("Equal", ["sr", f"rate{depth}"], [f"is{depth}"]),
            helper.make_node(
                "If", [f"is{depth}"], [out],
                then_branch=branch(f"rate{rate}", [_const(
                    f"g{depth}", np.array([gain], np.float32))], f"g{depth}"),
                else_branch=branch(f"not{rate}", _gain_nodes(rest, depth + 1),
                                   f"gain{depth + 1}"))]


def voice_activity(*, batch: int | str | None = "batch", features: int = 16, hidden: int = 4,
                   sample_rate_input: bool = True, seed: int = 0) -> onnx.ModelProto:
    """A recurrent voice-activity-like model in the layout of silero-vad.

    Inputs ``input [B, features]``, ``state [2, B, hidden]`` (h and c stacked on axis 0, the
    batch on axis 1) and, with ``sample_rate_input``, a 0-d int64 ``sr`` that must be one of
    :data:`SAMPLE_RATES` (other values make onnxruntime fail, as silero-vad does). Outputs
    ``output [B, 1]`` and ``stateN [2, B, hidden]``. An Identity gives ``cleanup`` work.

    Args:
        batch: The batch dim: a symbol, a fixed size, or None (dynamic without a name).
        features: Samples per chunk.
        hidden: State width.
        sample_rate_input: Whether the model has the ``sr`` input.
        seed: Weight seed.
    """
    rng = np.random.default_rng(seed)
    b = "" if batch is None else batch

    def dims(*shape):
        return [b if d == "B" else d for d in shape]

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims("B", features)),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, dims(2, "B", hidden))]
    nodes = [
        _const("w", rng.normal(0, 0.5, (features, hidden)).astype(np.float32)),
        _const("u", rng.normal(0, 0.5, (hidden, hidden)).astype(np.float32)),
        _const("v", rng.normal(0, 0.5, (hidden, 1)).astype(np.float32)),
        _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)),
        _const("axis0", np.array([0], np.int64)),
        helper.make_node("Identity", ["input"], ["x"]),
        helper.make_node("Gather", ["state", "zero"], ["h"], axis=0),
        helper.make_node("Gather", ["state", "one"], ["c"], axis=0),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("MatMul", ["h", "u"], ["hu"]),
        helper.make_node("Add", ["xw", "hu"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["act"]),
    ]
    if sample_rate_input:
        inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
        nodes += [*_gain_nodes(sorted(SAMPLE_RATES.items(), reverse=True)),
                  helper.make_node("Mul", ["act", "gain0"], ["h_new"])]
    else:
        nodes.append(helper.make_node("Identity", ["act"], ["h_new"]))
    nodes += [
        helper.make_node("Add", ["c", "h_new"], ["c_new"]),
        helper.make_node("Unsqueeze", ["h_new", "axis0"], ["h_out"]),
        helper.make_node("Unsqueeze", ["c_new", "axis0"], ["c_out"]),
        helper.make_node("Concat", ["h_out", "c_out"], ["stateN"], axis=0),
        helper.make_node("MatMul", ["h_new", "v"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims("B", 1)),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, dims(2, "B", hidden))]
    graph = helper.make_graph(nodes, "voice_activity", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def voice_activity_data(n: int, *, features: int = 16, hidden: int = 4, sr: int = 16000,
                        seed: int = 1) -> dict[str, np.ndarray]:
    """``n`` samples for :func:`voice_activity`: ``input [n, F]``, ``state [2, n, H]``, ``sr``."""
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((n, features)).astype(np.float32),
            "state": rng.standard_normal((2, n, hidden)).astype(np.float32),
            "sr": np.array(sr, np.int64)}


def sequence_input() -> onnx.ModelProto:
    """Inputs ``seq`` (a sequence of float ``[N, 3]`` tensors) and ``x [N, 3]``: ``x`` is
    appended to the sequence (output ``seq_out``) and the sequence is concatenated (``joined``)."""
    tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", 3])
    seq = helper.make_value_info("seq", helper.make_sequence_type_proto(tensor))
    seq_out = helper.make_value_info("seq_out", helper.make_sequence_type_proto(tensor))
    nodes = [helper.make_node("Identity", ["x"], ["x1"]),
             helper.make_node("SequenceInsert", ["seq", "x1"], ["seq_out"]),
             helper.make_node("ConcatFromSequence", ["seq_out"], ["joined"], axis=0)]
    graph = helper.make_graph(
        nodes, "sequence_input",
        [seq, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [seq_out, helper.make_tensor_value_info("joined", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def optional_input() -> onnx.ModelProto:
    """Input ``opt``, an optional float ``[3]`` tensor, passed through Identity twice."""
    opt_type = helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [3]))
    nodes = [helper.make_node("Identity", ["opt"], ["mid"]),
             helper.make_node("Identity", ["mid"], ["opt_out"])]
    graph = helper.make_graph(nodes, "optional_input",
                              [helper.make_value_info("opt", opt_type)],
                              [helper.make_value_info("opt_out", opt_type)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def zipmap_classifier() -> onnx.ModelProto:
    """``ai.onnx.ml`` LinearClassifier + ZipMap on ``x [N, 3]``, behind an Identity.

    Outputs ``label [N]`` (int64) and ``probs``, a sequence of maps from class to
    probability: a type onnx_ir cannot represent.
    """
    probs_type = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("LinearClassifier", ["x1"], ["label", "scores"], domain="ai.onnx.ml",
                         classlabels_ints=[0, 1, 2], post_transform="SOFTMAX",
                         coefficients=[0.5, -0.2, 0.1, -0.3, 0.4, 0.2, 0.1, 0.1, -0.6],
                         intercepts=[0.0, 0.1, -0.1]),
        helper.make_node("ZipMap", ["scores"], ["probs"], domain="ai.onnx.ml",
                         classlabels_int64s=[0, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes, "zipmap_classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                   ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_value_info("probs", probs_type)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
