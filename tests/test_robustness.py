"""cleanup and fold-bn across opsets 7..newest, old IR, float16, custom domains, dynamic shapes.

Each case runs end to end through ``optimize`` and is checked by an independent runtime run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import session as session_module
from onnxopt.api import optimize
from onnxopt.cli import main
from onnxopt.compare import compare_outputs, scaled_tolerance
from onnxopt.errors import UserError
from onnxopt.ir import add_initializer, clone_model, const_array, to_proto
from onnxopt.model_io import file_size, load, serialized_size
from onnxopt.pass_base import Pass, PassContext, PassResult, Tolerance, get_pass
from onnxopt.session import run_model
from testmodels import conv_chain
from tests.helpers import op_counts

NEWEST_OPSET = onnx.defs.onnx_opset_version()


def _conv_bn_model(opset: int, dtype: type = np.float32,
                   dims: Sequence[int | str] = ("N", 3, 8, 8)) -> onnx.ModelProto:
    """``Conv -> BN -> Relu -> Identity -> Dropout -> Conv -> BN`` at ``opset``.

    Opset 7 gets IR version 3, where every initializer is also listed as a graph input.
    """
    rng = np.random.default_rng(opset)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    params = {
        "w1": rng.normal(0, 0.3, (4, 3, 3, 3)), "b1": rng.normal(0, 0.1, 4),
        "w2": rng.normal(0, 0.3, (5, 4, 1, 1)),
    }
    for bn in ("bn1", "bn2"):
        c = 4 if bn == "bn1" else 5
        params |= {f"{bn}.s": rng.uniform(0.5, 1.5, c), f"{bn}.b": rng.normal(0, 0.3, c),
                   f"{bn}.m": rng.normal(0, 0.3, c), f"{bn}.v": rng.uniform(0.5, 1.5, c)}
    inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in params.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.s", "bn1.b", "bn1.m", "bn1.v"],
                         ["n1"]),
        helper.make_node("Relu", ["n1"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"]),
        helper.make_node("Dropout", ["i"], ["d"]),
        helper.make_node("Conv", ["d", "w2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2.s", "bn2.b", "bn2.m", "bn2.v"],
                         ["y"]),
    ]
    out_dims = [dims[0], 5, *dims[2:]]
    inputs = [helper.make_tensor_value_info("x", elem, list(dims))]
    if opset < 9:
        inputs += [helper.make_tensor_value_info(i.name, elem, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, f"conv_bn_opset{opset}", inputs,
                              [helper.make_tensor_value_info("y", elem, out_dims)], inits)
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _ort_can_load(model: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # e.g. an IR version or opset newer than this onnxruntime
        return False
    return True


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
             reference: bool) -> list[np.ndarray]:
    if reference:
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(model).run(None, feeds))
    return run_model(model, feeds)


def _x(shape: Sequence[int], dtype: type = np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


# -- opsets and IR versions -------------------------------------------------------------------


@pytest.mark.parametrize("opset", sorted({7, 9, 11, 13, NEWEST_OPSET}))
def test_cleanup_fold_bn_at_opset(opset: int) -> None:
    """Every opset from 7 to the newest onnx ships; old IR 3 at opset 7.

    onnxruntime may not support the newest opset yet; then the manager runs without
    validation and the outputs are checked with onnx's reference evaluator.
    """
    model = _conv_bn_model(opset)
    runnable = _ort_can_load(model)
    assert runnable or opset == NEWEST_OPSET
    result, report = optimize(model, "cleanup,fold-bn", validate=runnable)
    assert [r.status for r in report.records] == ["kept", "kept"], report.records
    assert report.records[0].stats["identities"] == report.records[0].stats["dropouts"] == 1
    assert op_counts(result) == {"Conv": 2, "Relu": 1}
    proto = to_proto(result)
    assert proto.opset_import[0].version == opset
    assert [i.name for i in proto.graph.input] == ["x"]  # old-IR weight inputs became constants
    onnx.checker.check_model(proto, full_check=True)
    feeds = _x((2, 3, 8, 8))
    cmp = compare_outputs(_outputs(model, feeds, not runnable),
                          _outputs(proto, feeds, not runnable), ["y"])
    assert cmp, cmp.summary()


def test_cleanup_fold_bn_float16_with_scaled_tolerance() -> None:
    model = _conv_bn_model(17, np.float16)
    result, report = optimize(model, "cleanup,fold-bn")
    assert [r.status for r in report.records] == ["kept", "kept"], report.records
    assert report.records[1].vs_previous.tolerance.rtol > Tolerance().rtol  # widened to fp16
    proto = to_proto(result)
    assert "BatchNormalization" not in op_counts(proto)
    assert {i.data_type for i in proto.graph.initializer} == {TensorProto.FLOAT16}
    feeds = _x((4, 3, 8, 8), np.float16)
    ref, got = run_model(model, feeds), run_model(proto, feeds)
    assert got[0].dtype == np.float16
    cmp = compare_outputs(ref, got, ["y"], scaled_tolerance(Tolerance(), ref))
    assert cmp, cmp.summary()


# -- custom domains ---------------------------------------------------------------------------


def test_custom_domain_runnable_node_left_alone() -> None:
    """A com.microsoft contrib op (which onnxruntime runs) is neither folded nor moved."""
    model = _conv_bn_model(17)
    graph = model.graph
    graph.output[0].name = "y0"
    graph.node[-1].output[0] = "y0"
    graph.node.extend([
        helper.make_node("Gelu", ["y0"], ["y"], domain="com.microsoft", name="gelu_act"),
        helper.make_node("Gelu", ["k"], ["gk"], domain="com.microsoft", name="gelu_const"),
    ])
    graph.node[-2].input[0] = "y0"
    graph.node.append(helper.make_node("Add", ["y", "gk"], ["z"]))
    graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "k"))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                           ["N", 5, 8, 8]))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    result, report = optimize(model, "cleanup,fold-bn")
    assert [r.status for r in report.records] == ["kept", "kept"], report.records
    assert report.records[0].stats["fold_skipped"] == {"custom_domain": 1}
    proto = to_proto(result)
    gelus = [n for n in proto.graph.node if n.op_type == "Gelu"]
    assert [(n.name, n.domain) for n in gelus] == [("gelu_act", "com.microsoft"),
                                                   ("gelu_const", "com.microsoft")]
    assert {o.domain: o.version for o in proto.opset_import}["com.microsoft"] == 1
    feeds = _x((2, 3, 8, 8))
    assert compare_outputs(run_model(model, feeds), run_model(proto, feeds), ["z"])


def test_unknown_domain_lookalikes_untouched() -> None:
    """Ops named BatchNormalization/Identity in a custom domain are not ONNX's: no rewrite."""
    model = _conv_bn_model(17)
    for node in model.graph.node:
        if node.op_type in ("BatchNormalization", "Identity"):
            node.domain = "custom.ops"
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    before = op_counts(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    ir_model = load(work)
    cleanup = get_pass("cleanup")().run(ir_model, PassContext())
    fold = get_pass("fold-bn")().run(ir_model, PassContext())
    assert cleanup.stats["identities"] == 0 and cleanup.stats["dropouts"] == 1
    assert fold.modified is False and fold.stats["folded"] == 0
    after = op_counts(ir_model)
    before["Dropout"] -= 1
    assert after == +before
    customs = [n for n in ir_model.graph if n.domain == "custom.ops"]
    assert [n.op_type for n in customs] == ["BatchNormalization", "Identity",
                                            "BatchNormalization"]


# -- dynamic shapes ---------------------------------------------------------------------------


def _dynamic_chain(spatial: bool) -> onnx.ModelProto:
    """conv_chain with a symbolic batch and, if ``spatial``, symbolic height and width."""
    model = conv_chain(batch="N")
    if spatial:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.checker.check_model(model, full_check=True)
    return model


def test_symbolic_batch_needs_no_input_shape() -> None:
    model = _dynamic_chain(spatial=False)
    result, report = optimize(model, "cleanup,fold-bn")
    assert [r.status for r in report.records] == ["unchanged", "kept"]
    dim0 = to_proto(result).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"
    for batch in (1, 5):
        feeds = {"input": _x((batch, 3, 16, 16))["x"]}
        assert compare_outputs(run_model(model, feeds), run_model(result, feeds), ["logits"])


def test_symbolic_spatial_dims_through_optimize() -> None:
    model = _dynamic_chain(spatial=True)
    with pytest.raises(UserError, match="--input-shape input:"):
        optimize(model, "cleanup,fold-bn")
    result, report = optimize(model, "cleanup,fold-bn", input_shapes={"input": (2, 3, 16, 16)})
    assert [r.status for r in report.records] == ["unchanged", "kept"]
    assert "BatchNormalization" not in op_counts(result)
    proto = to_proto(result)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]  # the override is for validation only, not baked in
    for shape in ((1, 3, 16, 16), (3, 3, 12, 20)):
        feeds = {"input": _x(shape)["x"]}
        assert compare_outputs(run_model(model, feeds), run_model(proto, feeds), ["logits"])


def test_cli_dynamic_spatial_dims_need_input_shape(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_chain(spatial=True), path)
    out = tmp_path / "dyn.opt.onnx"
    code = main([str(path), "-p", "cleanup,fold-bn", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("onnxopt: error: ")
    assert "--input-shape" in err and "input" in err
    assert not out.exists()

    code = main([str(path), "-p", "cleanup,fold-bn", "-o", str(out), "-q", "--strict",
                 "--input-shape", "input:1x3x16x16"])
    assert code == 0, capsys.readouterr().err
    written = onnx.load(out)
    assert "BatchNormalization" not in op_counts(written)
    assert written.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "H"


def test_cli_model_onnxruntime_cannot_load_is_a_user_error(tmp_path: Path, capsys) -> None:
    """An opset/IR newer than the installed onnxruntime: one line, exit 2, --no-validate."""
    model = _conv_bn_model(NEWEST_OPSET)
    if _ort_can_load(model):
        model.ir_version = 99  # stand-in for "newer than this onnxruntime"
    path, out = tmp_path / "new.onnx", tmp_path / "new.opt.onnx"
    onnx.save(model, path)
    code = main([str(path), "-p", "cleanup,fold-bn", "-o", str(out), "--no-check"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "onnxruntime cannot run the input model" in err and "--no-validate" in err
    assert not out.exists()
    assert main([str(path), "-p", "cleanup,fold-bn", "-o", str(out), "--no-check",
                 "--no-validate", "-q"]) == 0
    assert "BatchNormalization" not in op_counts(onnx.load(out))


# -- external data and big models ------------------------------------------------------------


def _external_model(folder: Path) -> Path:
    """conv_chain saved with every weight in ``model.onnx.data`` beside it."""
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(conv_chain(), path, save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return path


class _Perturb(Pass):
    """Test-only: rescales a Conv weight but claims to be exact (so it is rolled back)."""

    name = "test-robustness-perturb"
    description = "test pass that changes a weight"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        node = next(n for n in model.graph if n.op_type == "Conv")
        node.replace_input_with(1, add_initializer(model.graph, "perturbed",
                                                   const_array(node.inputs[1]) * 1.5))
        return PassResult(modified=True)


def test_external_data_model_round_trip_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    """Regressions: with external data and the working directory elsewhere, the checker
    rolled cleanup back, a rollback lost the weights' folder, and the output pointed at the
    input's data file."""
    src = _external_model(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "out" / "model.opt.onnx"
    result, report = optimize(src, [get_pass("cleanup")(), _Perturb(), get_pass("fold-bn")()],
                              output=out)
    assert [r.status for r in report.records] == ["unchanged", "rolled back", "kept"]
    assert (tmp_path / "out" / "model.opt.onnx.data").exists()  # external in, external out
    written = onnx.load(out)  # loads its data from the output folder
    assert "BatchNormalization" not in op_counts(written)
    feeds = {"input": _x((2, 3, 16, 16))["x"]}
    assert compare_outputs(run_model(onnx.load(src), feeds), run_model(written, feeds),
                           ["logits"])
    assert abs(serialized_size(result) - file_size(out)) < 2048


def test_snapshot_shares_weights_and_constants_are_read_only() -> None:
    model = load(conv_chain())
    copy = clone_model(model)
    name = next(iter(model.graph.initializers))
    assert copy.graph.initializers[name].const_value is model.graph.initializers[name].const_value
    assert copy.graph is not model.graph
    array = const_array(model.graph.initializers[name])
    with pytest.raises(ValueError, match="read-only"):
        array[...] = 0


def test_big_model_path_feeds_weights_without_copies(monkeypatch) -> None:
    """Above the protobuf limit make_session feeds the weights; the manager's checks and the
    passes work on that path (exercised here by lowering the limit)."""
    model = _dynamic_chain(spatial=False)
    feeds = {"input": _x((2, 3, 16, 16))["x"]}
    reference = run_model(model, feeds)
    monkeypatch.setattr(session_module, "_PROTO_LIMIT", 0)
    session = session_module.make_session(load(model))
    assert isinstance(session, session_module.FedWeightsSession)
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert compare_outputs(reference, session.run(None, feeds), ["logits"])
    result, report = optimize(model, "cleanup,fold-bn")
    assert [r.status for r in report.records] == ["unchanged", "kept"]
    assert compare_outputs(reference, run_model(result, feeds), ["logits"])
