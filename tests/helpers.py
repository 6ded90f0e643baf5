"""Shared test utilities: random feeds, applying one pass, op counts and numeric checks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt.compare import compare_outputs, sqnr_db
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import input_specs
from onnxopt.feeds import FeedSource
from onnxopt.ir import from_proto, to_proto
from onnxopt.pass_base import Pass, PassContext, PassResult
from onnxopt.session import make_session, run_model


def random_feeds(model: onnx.ModelProto | ir.Model, batch: int = 2, seed: int = 0,
                 ) -> dict[str, np.ndarray]:
    """One feed dict of standard-normal float32 data; symbolic dims become ``batch``."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    init_names = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def all_feeds(source: FeedSource, model: onnx.ModelProto | ir.Model) -> dict[str, np.ndarray]:
    """Every sample of ``source`` as one feed dict, as the model's inputs accept it."""
    work = from_proto(model) if isinstance(model, onnx.ModelProto) else model
    batches = [feeds for feeds, _ in source.batches(input_specs(work))]
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def apply_pass(pass_: Pass, model: onnx.ModelProto | ir.Model,
               ctx: PassContext | None = None) -> tuple[ir.Model, PassResult]:
    """Run one pass on a copy of ``model``; returns the rewritten model and the result."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    work = from_proto(proto)
    result = pass_.run(work, ctx or PassContext())
    onnx.checker.check_model(to_proto(work), full_check=True)
    return work, result


def op_counts(model: onnx.ModelProto | ir.Model) -> Counter:
    """Histogram of op types in the main graph."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    return Counter(n.op_type for n in proto.graph.node)


def assert_same_outputs(before: onnx.ModelProto | ir.Model, after: onnx.ModelProto | ir.Model,
                        feeds: dict[str, np.ndarray], rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    """Both models give the same outputs in onnxruntime within the pass tolerance."""
    from onnxopt.pass_base import Tolerance

    ref = run_model(before, feeds)
    got = run_model(after, feeds)
    proto = before if isinstance(before, onnx.ModelProto) else to_proto(before)
    names = [o.name for o in proto.graph.output]
    cmp = compare_outputs(ref, got, names, Tolerance(rtol=rtol, atol=atol))
    assert cmp, cmp.summary()


def two_layer_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """``y = ReduceSum(Relu(x @ w))`` over ``x [N, 4]``, with its weight ``w [4, 6]``."""
    w = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def macs_timer(items) -> list[float]:  # noqa: ANN001 - (model proto, feeds) pairs
    """A fake one-node timer for planner logic: seconds proportional to each model's MACs."""
    return [1e-9 * (model_cost(infer_shapes(from_proto(proto))).macs or 0) + 1e-6
            for proto, _ in items]


def ort_ops(model, folder: Path) -> Counter:  # noqa: ANN001 - proto or IR model
    """Op histogram of the graph onnxruntime writes after its optimizations (a fresh file in
    ``folder``): which ops run as integer kernels, which stay float."""
    path = folder / f"ort_optimized_{len(list(folder.iterdir()))}.onnx"
    make_session(model, optimized_path=str(path))
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    """SQNR in dB of ``actual`` against ``reference`` (float64 sums)."""
    ref = reference.astype(np.float64)
    return sqnr_db(float(np.sum(ref ** 2)), float(np.sum((actual.astype(np.float64) - ref) ** 2)))
