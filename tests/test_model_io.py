"""Model I/O: sources, external data (lazy, size threshold, path safety), old IR, atomic save,
opset conversion."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import model_io
from onnxopt.errors import ModelError
from onnxopt.ir import to_proto
from onnxopt.model_io import load, save
from onnxopt.opset import OpsetConversionError, convert_opset
from testmodels.old_opsets import conv_relu_gemm, conv_then_scan8
from testmodels.structures import conv_chain
from tests.helpers import assert_same_outputs, random_feeds


def test_load_from_path_proto_and_ir(conv_chain_path):
    proto = onnx.load(conv_chain_path)
    from_path = load(conv_chain_path)
    from_proto = load(proto)
    assert load(from_proto) is from_proto
    assert from_path.graph.num_nodes() == from_proto.graph.num_nodes() == len(proto.graph.node)


def test_external_data_is_lazy_and_round_trips(tmp_path):
    proto = conv_chain()
    src = tmp_path / "src.onnx"
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="src.onnx.data", size_threshold=0)
    model = load(src)
    lazy = [v.const_value for v in model.graph.initializers.values()]
    assert any(isinstance(t, ir.ExternalTensor) for t in lazy)
    fresh = conv_chain()  # onnx.save moved the weights of `proto` out to the file
    assert_same_outputs(fresh, model, random_feeds(fresh), rtol=0, atol=0)


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "big.onnx"
    save(load(conv_chain()), out)
    assert (tmp_path / "big.onnx.data").exists()
    header = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    assert_same_outputs(conv_chain(), load(out), random_feeds(header), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_external_data_escaping_model_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    path = inner / "m.onnx"
    onnx.save(conv_chain(), path, save_as_external_data=True, location="m.data",
              size_threshold=0)
    (tmp_path / "secret.data").write_bytes((inner / "m.data").read_bytes())
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save(proto, path)
    with pytest.raises(ModelError, match="outside the model folder"):
        load(path)


def test_old_ir_initializers_as_inputs_become_constants():
    proto = conv_chain()
    for init in proto.graph.initializer:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(
            init.name, init.data_type, list(init.dims)))
    proto.ir_version = 3
    model = load(proto)
    assert [v.name for v in model.graph.inputs] == ["input"]
    assert all(not v.is_graph_input() for v in model.graph.initializers.values())
    assert_same_outputs(proto, model, random_feeds(conv_chain()), rtol=0, atol=0)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    save(load(conv_chain()), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    onnx.checker.check_model(onnx.load(out))


def test_serialized_size_matches_file(tmp_path):
    model = load(conv_chain())
    out = save(model, tmp_path / "m.onnx")
    assert abs(model_io.serialized_size(model) - out.stat().st_size) < 64
    assert np.isclose(model_io.file_size(out), out.stat().st_size)
    assert to_proto(model).graph.name == onnx.load(out).graph.name


def test_convert_opset_hands_the_same_weight_tensors_to_the_new_graph():
    proto = conv_relu_gemm(9)
    model = load(proto)
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    convert_opset(model, 13)
    assert model.opset_imports[""] == 13 and model.ir_version == 7
    assert list(model.graph.initializers) == list(before)  # order kept
    assert [v.name for v in model.graph.inputs] == ["x"]
    large = [n for n, t in before.items() if t.nbytes > 1024]
    assert large  # the conv and gemm weights never went through the converter
    assert all(model.graph.initializers[n].const_value is before[n] for n in large)
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


def test_convert_opset_keeps_external_weights_mapped(tmp_path):
    proto = conv_relu_gemm(11)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = load(src)
    convert_opset(model, 13)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    fresh = conv_relu_gemm(11)
    assert_same_outputs(fresh, model, random_feeds(fresh), rtol=0, atol=0)


def test_convert_opset_failure_names_the_op_and_leaves_the_model_alone():
    proto = conv_then_scan8()
    model = load(proto)
    graph = model.graph
    with pytest.raises(OpsetConversionError) as caught:
        convert_opset(model, 13)
    assert caught.value.op_type == "Scan"
    assert str(caught.value).startswith("cannot convert opset 8 to 13: Scan has no conversion")
    assert model.graph is graph and model.opset_imports[""] == 8
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


def test_convert_opset_finds_the_op_when_the_message_does_not_name_it():
    from onnxopt.opset import _conversion_error

    proto = conv_then_scan8()
    error = _conversion_error(RuntimeError("Assertion failed: something else"), proto, 8, 13)
    assert error.op_type == "Scan"  # found by converting one node at a time
    assert "Scan has no conversion (something else)" in str(error)


def test_written_files_follow_the_umask(tmp_path, umask_027):
    """Atomic writes go through tempfile (0600/0700); the results get the user's umask."""
    text = model_io.write_text(tmp_path / "report.json", "{}")
    model = save(load(conv_chain()), tmp_path / "m.onnx")
    external = save(load(conv_chain()), tmp_path / "e.onnx", external_data=True)
    for path in (text, model, external, tmp_path / "e.onnx.data"):
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert model_io.current_umask() == 0o027


def test_ml_domain_model_with_map_outputs_is_accepted_and_optimized(tmp_path, capsys):
    from onnxopt.cli import main
    from onnxopt.model_io import check_model
    from onnxopt.session import make_session
    from testmodels.inputs import zipmap_classifier

    proto = zipmap_classifier()
    path, out = tmp_path / "ml.onnx", tmp_path / "ml.opt.onnx"
    onnx.save(proto, path)
    model = load(path)
    check_model(model, path)
    check_model(model)  # through the proto onnx_ir writes back: the map type is restored
    assert to_proto(model).graph.output[1].type == proto.graph.output[1].type
    code = main([str(path), "-p", "cleanup", "-o", str(out), "--strict"])
    assert code == 0, capsys.readouterr().err
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert [n.op_type for n in written.graph.node] == ["LinearClassifier", "ZipMap"]
    assert written.graph.output[1].type == proto.graph.output[1].type
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    (labels, probs), (labels2, probs2) = (make_session(p).run(None, {"x": x})
                                          for p in (proto, written))
    np.testing.assert_array_equal(labels, labels2)
    assert probs == probs2 and len(probs) == 5 and set(probs[0]) == {0, 1, 2}
