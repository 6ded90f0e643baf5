"""onnxopt.inputs: batch axes read from the model's dims, and data types checked, not coerced."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.cli import main
from onnxopt.data import open_feeds
from onnxopt.errors import DataError
from onnxopt.inputs import batch_axes, input_specs
from onnxopt.model_io import load
from testmodels.inputs import voice_activity
from testmodels.structures import conv_chain


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("shapes", "axes"), [
    # silero-vad 16k: the batch symbol is named by the first input and found in the state
    ([("batch", "sequence"), (2, "batch", 128), ()], [0, 1, None]),
    # silero-vad without symbols: the state's one dynamic dim is its batch
    ([(None, None), (2, None, 128), ()], [0, 1, None]),
    # fully static (an OpenVINO export): the state holds the first input's batch size
    ([(1, 576), (2, 1, 128)], [0, 1]),
    # sequence model: the fixed LSTM states carry no batch and are fed as given
    ([("sequence_length", 576), (1, 1, 128), (1, 1, 128)], [0, None, None]),
    # an image model with a second input of its own symbol keeps axis 0
    ([("N", 3, 8, 8), ("M", 4)], [0, 0]),
    # a non-tensor input (None) never has a batch axis
    ([None, ("N", 3)], [None, 0]),
])
def test_batch_axes_follow_the_models_dims(shapes, axes):
    assert batch_axes(shapes) == axes


def test_specs_keep_the_models_batch_axis_under_overrides():
    model = load(voice_activity())
    specs = {s.name: s for s in input_specs(model, {"input": (1, 16), "state": (2, 1, 4)})}
    assert specs["state"].dims == (2, 1, 4) and specs["state"].batch_axis == 1
    assert specs["sr"].batch_axis is None and specs["sr"].dims == ()
    assert specs["state"].shape_text() == "[2, 1, 4]"
    assert input_specs(model)[1].shape_text() == "[2, N, 4]"
    with pytest.raises(DataError, match=r"--input-shape state:2x4 has 2 dims; input 'state' "
                                        r"has 3 \(\[2, N, 4\]\)"):
        input_specs(model, {"state": (2, 4)})


# -- data types -------------------------------------------------------------------------------


@pytest.fixture()
def chain_path(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), path)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_integer_data_for_a_float_input_is_an_error_that_says_how_to_normalise(
        tmp_path, capsys, chain_path, dtype):
    data = tmp_path / "pixels.npz"
    np.savez(data, input=np.full((4, 3, 16, 16), 200, dtype))
    code = main([str(chain_path), "-p", "cleanup", "--calib", str(data),
                 "-o", str(tmp_path / "o.onnx")])
    line = _one_line_error(capsys, code)
    name = np.dtype(dtype).name
    assert (f"pixels.npz: input 'input' is {name} but the model takes float32: convert and "
            f"normalise it the way the model was trained (e.g. x.astype('float32') / 255)"
            in line)
    assert "--cast-inputs" in line
    assert not (tmp_path / "o.onnx").exists()


def test_cast_inputs_converts_integer_data_as_it_is(tmp_path, capsys, chain_path):
    data = tmp_path / "pixels.npz"
    pixels = np.random.default_rng(0).integers(0, 3, (6, 3, 16, 16)).astype(np.uint8)
    np.savez(data, input=pixels)
    out = tmp_path / "o.onnx"
    code = main([str(chain_path), "-p", "cleanup,fold-bn", "--calib", str(data),
                 "--cast-inputs", "-o", str(out), "--strict"])
    assert code == 0, capsys.readouterr().err
    source = open_feeds(data, load(conv_chain()), cast_inputs=True)
    (feeds, _), = source.batches(input_specs(load(conv_chain())))
    assert feeds["input"].dtype == np.float32
    np.testing.assert_array_equal(feeds["input"], pixels.astype(np.float32))


def test_float64_is_cast_with_one_warning_per_input_and_source(tmp_path, caplog):
    data = tmp_path / "f64.npz"
    x = np.random.default_rng(1).standard_normal((10, 3, 16, 16))
    np.savez(data, input=x)
    with caplog.at_level(logging.WARNING, logger="onnxopt"):
        _, report = onnxopt.optimize(conv_chain(), "cleanup,fold-bn,dead-layers", eval=data)
    assert [r.status.value for r in report.records][1] == "kept"
    notes = [r.getMessage() for r in caplog.records if "float64" in r.getMessage()]
    # the data ran through the original and each changed stage; the note came once
    assert notes == [f"{data}: input 'input' is float64; cast to float32, the model's type"]
    model = load(conv_chain())
    (feeds, _), = open_feeds(data, model).batches(input_specs(model))
    np.testing.assert_array_equal(feeds["input"], x.astype(np.float32))


def test_integer_widths_convert_only_when_the_values_fit(tmp_path):
    model = load(voice_activity())
    specs = input_specs(model)
    rng = np.random.default_rng(0)
    base = {"input": rng.standard_normal((3, 16)).astype(np.float32),
            "state": np.zeros((2, 3, 4), np.float32)}
    (feeds, _), = open_feeds({**base, "sr": np.array(16000, np.int32)}, model).batches(specs)
    assert feeds["sr"].dtype == np.int64 and feeds["sr"] == 16000
    (feeds, _), = open_feeds({**base, "sr": np.array(8000, np.uint64)}, model).batches(specs)
    assert feeds["sr"].dtype == np.int64 and feeds["sr"] == 8000
    too_big = {**base, "sr": np.array(2**63 + 5, np.uint64)}
    with pytest.raises(DataError, match="'sr' is uint64 with values outside the range of int64"):
        list(open_feeds(too_big, model).batches(specs))
    with pytest.raises(DataError, match="'sr' is float64 but the model takes int64"):
        list(open_feeds({**base, "sr": np.array(16000.0)}, model).batches(specs))
    (feeds, _), = open_feeds({**base, "sr": np.array(16000.0)}, model,
                             cast_inputs=True).batches(specs)
    assert feeds["sr"].dtype == np.int64 and feeds["sr"] == 16000


def test_shape_errors_quote_the_files_shape_and_sample_count(tmp_path, capsys, chain_path):
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.zeros((100, 1, 28, 28), np.float32))
    code = main([str(chain_path), "-p", "cleanup", "--calib", str(data)])
    assert _one_line_error(capsys, code) == (
        f"onnxopt: error: {data}: input 'input' has shape [100, 1, 28, 28] (100 samples); "
        f"the model expects [N, 3, 16, 16]")


def test_a_minus_one_batch_dim_is_dynamic_and_data_is_batched_along_it():
    # exporters write -1 for a dynamic dim; it used to be taken as a size and crash the batching
    from onnxopt import optimize
    from testmodels.dynamic import dynamic_hw_net

    proto = dynamic_hw_net(batch=-1)
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    _, report = optimize(proto, "cleanup,fold-bn", eval={proto.graph.input[0].name: x})
    assert report.validated_samples == 6
    assert not report.failures
