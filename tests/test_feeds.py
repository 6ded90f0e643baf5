"""onnxopt.feeds: inputs batched on their own axis, fed as given, or one sample at a time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.cli import main
from onnxopt.data import from_iterable, open_feeds
from onnxopt.errors import DataError
from onnxopt.inputs import input_specs
from onnxopt.model_io import load
from onnxopt.session import make_session
from testmodels.inputs import (
    optional_input,
    sequence_input,
    voice_activity,
    voice_activity_data,
)

PIPELINE = "cleanup,fold-bn,fuse-resconv,prune-zero,dead-layers"


def _per_sample(session, data: dict[str, np.ndarray], n: int) -> list[list[np.ndarray]]:
    """The model run on each sample alone (batch of one), the reference for batched runs."""
    runs = []
    for i in range(n):
        sr = data["sr"] if data["sr"].ndim == 0 else data["sr"][i, ...]
        runs.append(session.run(None, {"input": data["input"][i:i + 1],
                                       "state": data["state"][:, i:i + 1], "sr": sr}))
    return runs


def test_state_is_batched_on_axis_1_and_the_sample_rate_fed_as_given(tmp_path):
    model = load(voice_activity())
    data = voice_activity_data(40)
    np.savez(tmp_path / "d.npz", **data)
    specs = input_specs(model)
    batches = [f for f, _ in open_feeds(tmp_path / "d.npz", model).batches(specs, 16)]
    assert [(f["input"].shape, f["state"].shape, f["sr"].shape) for f in batches] == [
        ((16, 16), (2, 16, 4), ()), ((16, 16), (2, 16, 4), ()), ((8, 16), (2, 8, 4), ())]
    np.testing.assert_array_equal(batches[1]["state"], data["state"][:, 16:32])
    session = make_session(model)
    reference = _per_sample(session, data, 40)
    got = [session.run(None, f) for f in batches]
    outputs = np.concatenate([g[0] for g in got])
    states = np.concatenate([g[1] for g in got], axis=1)
    np.testing.assert_allclose(outputs, np.concatenate([r[0] for r in reference]), rtol=1e-6)
    np.testing.assert_allclose(states, np.concatenate([r[1] for r in reference], axis=1),
                               rtol=1e-6)


def test_a_sample_rate_per_sample_runs_one_sample_at_a_time():
    model = load(voice_activity())
    data = voice_activity_data(6)
    data["sr"] = np.array([16000, 8000] * 3)
    batches = list(open_feeds(data, model).batches(input_specs(model), 32))
    assert [(f["input"].shape, f["state"].shape, int(f["sr"])) for f, _ in batches] == [
        ((1, 16), (2, 1, 4), sr) for sr in data["sr"]]
    session = make_session(model)
    for (feeds, _), ref in zip(batches, _per_sample(session, data, 6), strict=True):
        np.testing.assert_allclose(session.run(None, feeds)[0], ref[0], rtol=1e-6)


def test_a_fixed_batch_model_takes_its_state_as_given_or_per_sample():
    model = load(voice_activity(batch=1))
    data = voice_activity_data(5)
    specs = input_specs(model)
    for state in (data["state"][:, :1], data["state"]):  # one state for all, or one each
        source = open_feeds({**data, "state": state}, model)
        batches = [f for f, _ in source.batches(specs, 32)]
        assert [f["state"].shape for f in batches] == [(2, 1, 4)] * 5
        np.testing.assert_array_equal(batches[3]["state"], state[:, :1] if
                                      state.shape[1] == 1 else state[:, 3:4])


def test_holdout_splits_the_state_on_its_batch_axis():
    model = load(voice_activity())
    data = voice_activity_data(10)
    data["state"] = np.arange(10, dtype=np.float32)[None, :, None] * np.ones((2, 1, 4),
                                                                           np.float32)
    rest, held = open_feeds(data, model).holdout(4)
    specs = input_specs(model)
    for part, want in ((rest, [1, 2, 3, 5, 6, 7, 9]), (held, [0, 4, 8])):
        states = [f["state"] for f, _ in part.batches(specs, 4)]
        assert np.concatenate(states, axis=1)[0, :, 0].astype(int).tolist() == want
        assert part.count(specs) == len(want)


def test_states_with_another_sample_count_are_refused_with_both_counts():
    model = load(voice_activity())
    data = voice_activity_data(8)
    data["state"] = data["state"][:, :7]
    with pytest.raises(DataError) as err:
        open_feeds(data, model)
    assert str(err.value) == ("arrays: input 'state' has shape [2, 7, 4] (7 samples on axis 1) "
                              "but input 'input' has 8 samples ([8, 16]); the model expects "
                              "[2, N, 4]")


@pytest.mark.parametrize("batch", ["batch", 1, None])
def test_cli_runs_the_pipeline_on_a_recurrent_model_with_real_data(tmp_path, capsys, batch):
    path, out = tmp_path / "vad.onnx", tmp_path / "vad.opt.onnx"
    onnx.save(voice_activity(batch=batch), path)
    data = voice_activity_data(24)
    np.savez(tmp_path / "d.npz", **data)
    code = main([str(path), "-p", PIPELINE, "--calib", str(tmp_path / "d.npz"), "-o", str(out),
                 "--strict", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert "validated on 24 samples" in capsys.readouterr().out
    before, after = make_session(onnx.load(path)), make_session(onnx.load(out))
    for ref, got in zip(_per_sample(before, data, 24), _per_sample(after, data, 24),
                        strict=True):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)


def test_random_data_fills_the_state_but_a_model_that_rejects_it_is_one_line(tmp_path,
                                                                            capsys):
    path = tmp_path / "vad.onnx"
    onnx.save(voice_activity(sample_rate_input=False), path)
    code = main([str(path), "-p", PIPELINE, "--calib", "random:20", "-o",
                 str(tmp_path / "a.onnx"), "--strict"])
    assert code == 0, capsys.readouterr().err
    assert "validated on 20 samples from random:20" in capsys.readouterr().out
    onnx.save(voice_activity(), path)
    code = main([str(path), "-p", PIPELINE, "-o", str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("onnxopt: error: onnxruntime cannot run the model on random:16: ")
    assert err.endswith("random values do not fit every model ('sr' got random integers in "
                        "[0, 10)): give real data with --calib or --eval")
    assert not (tmp_path / "b.onnx").exists()


def test_api_takes_arrays_and_feed_dicts_for_a_recurrent_model():
    data = voice_activity_data(12, sr=8000)
    _, report = onnxopt.optimize(voice_activity(), PIPELINE, calib=data)
    assert report.validated_samples == 12 and not report.failures
    assert report.records[0].status.value == "kept"
    # equal batches: the states are joined on their batch axis, so the first 16 samples an
    # exact pass is judged on are the same samples in every stage
    longer = voice_activity_data(24, sr=8000)
    _, report = onnxopt.optimize(voice_activity(), PIPELINE, calib=longer, batch_size=4)
    assert report.validated_samples == 24 and not report.failures
    assert report.records[0].status.value == "kept"
    feeds = [{"input": data["input"][i:i + 3], "state": data["state"][:, i:i + 3], "sr": 8000}
             for i in range(0, 12, 3)]
    _, report = onnxopt.optimize(voice_activity(), PIPELINE, eval=feeds)
    assert report.validated_samples == 12 and not report.failures


def _sequence_feed() -> dict:
    rng = np.random.default_rng(0)
    return {"seq": [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)],
            "x": rng.standard_normal((2, 3)).astype(np.float32)}


@pytest.mark.parametrize("wrap", [lambda f: f, lambda f: [f]], ids=["dict", "list of dicts"])
def test_sequence_and_optional_inputs_through_the_api(wrap):
    feed = _sequence_feed()
    result, report = onnxopt.optimize(sequence_input(), "cleanup", calib=wrap(feed))
    assert report.records[0].status.value == "kept" and not report.failures
    session = make_session(result)
    seq_out, joined = session.run(None, feed)
    assert len(seq_out) == 4
    np.testing.assert_array_equal(joined, np.concatenate([*feed["seq"], feed["x"]]))
    opt = {"opt": np.array([1.0, 2.0, 3.0], np.float32)}
    result, report = onnxopt.optimize(optional_input(), "cleanup", calib=wrap(opt))
    assert report.records[0].status.value == "kept" and not report.failures
    np.testing.assert_array_equal(make_session(result).run(None, opt)[0], opt["opt"])


def test_verbatim_feed_dicts_keep_sequences_and_none_as_they_are():
    model = load(optional_input())
    specs = input_specs(model)
    source = from_iterable([{"opt": None}, {"opt": [1.0, 2.0, 3.0]}])
    feeds = [f["opt"] for f, _ in source.batches(specs)]
    assert feeds[0] is None and feeds[1] == [1.0, 2.0, 3.0]
    with pytest.raises(DataError, match=r"cannot make random data for input 'seq' \(sequence\)"):
        open_feeds("random:4", load(sequence_input()))
