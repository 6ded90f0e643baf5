"""Data feeds: every source form, batching, and one-line errors for data that does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.data import input_specs, open_feeds, parse_input_shapes
from onnxopt.errors import DataError
from onnxopt.model_io import load
from testmodels.structures import conv_chain


@pytest.fixture()
def model():
    return load(conv_chain())


def _samples(source, model, batch=8):
    specs = input_specs(model)
    return [(f["input"].shape[0], None if lab is None else len(lab))
            for f, lab in source.batches(specs, batch)]


class _Reader:
    """A CalibrationDataReader of three runs of two samples."""

    def __init__(self):
        self.i = 0

    def get_next(self):
        self.i += 1
        return None if self.i > 3 else {"input": np.ones((2, 3, 16, 16), np.float32)}

    def rewind(self):
        self.i = 0


def test_npz_with_labels(tmp_path, model):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.ones((20, 3, 16, 16), np.float32), labels=np.arange(20))
    assert _samples(open_feeds(path, model), model) == [(8, 8), (8, 8), (4, 4)]


def test_npy_folder_per_input_and_per_sample(tmp_path, model):
    per_input = tmp_path / "a"
    per_input.mkdir()
    np.save(per_input / "input.npy", np.ones((10, 3, 16, 16), np.float32))
    np.save(per_input / "labels.npy", np.zeros(10, np.int64))
    assert _samples(open_feeds(per_input, model), model) == [(8, 8), (2, 2)]
    per_sample = tmp_path / "b"
    per_sample.mkdir()
    for i in range(5):
        np.save(per_sample / f"{i:03d}.npy", np.ones((1, 3, 16, 16), np.float32))
    assert _samples(open_feeds(per_sample, model), model) == [(5, None)]


def test_random_and_its_warning(model, caplog):
    source = open_feeds("random:10", model)
    assert not source.representative
    assert "not representative" in caplog.text
    assert _samples(source, model, batch=4) == [(4, None), (4, None), (2, None)]


def test_calibration_data_reader_protocol(model):
    source = open_feeds(_Reader(), model)
    # each get_next() is one run, as onnxruntime's quantization tool treats it
    assert _samples(source, model, batch=4) == [(2, None)] * 3
    assert _samples(source, model, batch=4) == [(2, None)] * 3  # rewound


def test_generator_of_feed_dicts_is_reusable(model):
    gen = ({"input": np.ones((1, 3, 16, 16), np.float32)} for _ in range(3))
    source = open_feeds(gen, model)
    assert _samples(source, model) == [(1, None)] * 3
    assert _samples(source, model) == [(1, None)] * 3


def test_wrong_dtype_and_nan_and_empty(tmp_path, model):
    specs = input_specs(model)
    bad_dtype = open_feeds({"input": np.ones((2, 3, 16, 16), np.complex64)}, model)
    with pytest.raises(DataError, match="'input' is complex64 but the model takes float32"):
        list(bad_dtype.batches(specs))
    nan = np.ones((2, 3, 16, 16), np.float32)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or Inf"):
        list(open_feeds({"input": nan}, model).batches(specs))
    with pytest.raises(DataError, match="no samples"):
        list(open_feeds([], model).batches(specs))


def test_holdout_interleaves_disjoint_parts_with_their_labels(tmp_path, model):
    path = tmp_path / "d.npz"
    images = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 16, 16))
    np.savez(path, input=images.astype(np.float32), labels=np.arange(10))
    source = open_feeds(path, model)
    rest, held = source.holdout(4)
    assert (rest.num_samples, held.num_samples) == (7, 3)
    specs = input_specs(model)
    for part, want in ((rest, [1, 2, 3, 5, 6, 7, 9]), (held, [0, 4, 8])):
        feeds, labels = zip(*part.batches(specs, 4), strict=True)
        ids = np.concatenate([f["input"][:, 0, 0, 0] for f in feeds]).astype(int).tolist()
        assert ids == want and np.concatenate(labels).tolist() == want
    assert source.holdout(1) == (source, source)


def test_holdout_keeps_verbatim_runs_whole(model):
    source = open_feeds(_Reader(), model)
    assert source.holdout(4) == (source, source)


def test_limit_and_fixed_batch():
    model = load(conv_chain(batch=1))
    specs = input_specs(model)
    source = open_feeds("random:5", model)
    assert [f["input"].shape[0] for f, _ in source.batches(specs, 32)] == [1] * 5
    assert len(list(source.batches(specs, 32, limit=3))) == 3


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1x3x224x224", "a:b:2x2"]) == {"x": (1, 3, 224, 224),
                                                                "a:b": (2, 2)}
    for bad in ["x", "x:1xy", "x:0x3", ":1x2"]:
        with pytest.raises(DataError):
            parse_input_shapes([bad])
