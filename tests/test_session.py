"""onnxopt.session: the one streaming loop, and intermediate tensors exposed as outputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.data import from_arrays
from onnxopt.feeds import input_specs
from onnxopt.ir import from_proto
from onnxopt.session import expose_tensors, make_session, run_model, stream, stream_tensors
from tests.helpers import two_layer_model


def test_stream_feeds_every_session_the_same_batches() -> None:
    proto, w = two_layer_model()
    model = from_proto(proto)
    x = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    labels = np.arange(20)
    source = from_arrays({"x": x, "labels": labels}, "x")
    sessions = [make_session(model), make_session(expose_tensors(model, ["h"]))]
    batches = list(stream(sessions, source, input_specs(model), outputs=[None, ["x", "h"]],
                          batch_size=8, limit=18))
    assert [len(b.feeds["x"]) for b in batches] == [8, 8, 2]
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels[:18])
    for batch in batches:
        (y,), (x_out, h) = batch.outputs
        assert x_out is batch.feeds["x"]  # a wanted input comes from the feeds
        np.testing.assert_allclose(h, batch.feeds["x"] @ w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y, np.maximum(h, 0).sum(), rtol=1e-5)  # ReduceSum of all
    with pytest.raises(ValueError, match="one output list per session"):
        next(stream(sessions, source, input_specs(model), outputs=[None]))


def test_stream_tensors_runs_two_models_side_by_side() -> None:
    proto, w = two_layer_model()
    model = from_proto(proto)
    x = np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)
    got = list(stream_tensors([model, model], [["h"], ["r", "x"]], from_arrays({"x": x}, "x"),
                              batch_size=4))
    assert len(got) == 3
    (first, second), labels = got[0]
    assert labels is None and set(first) == {"h"} and set(second) == {"r", "x"}
    np.testing.assert_allclose(second["r"], np.maximum(first["h"], 0), rtol=1e-6)


def test_expose_tensors_adds_outputs_on_a_copy() -> None:
    proto, _ = two_layer_model()
    model = from_proto(proto)
    exposed = expose_tensors(model, ["h"])
    assert [v.name for v in exposed.graph.outputs] == ["y", "h"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    x = np.ones((2, 4), np.float32)
    y, h = run_model(exposed, {"x": x})
    assert h.shape == (2, 6)
    with pytest.raises(KeyError, match="no tensor"):
        expose_tensors(model, ["nope"])


def test_concat_batches_joins_on_the_batch_axis() -> None:
    from onnxopt.session import concat_batches

    states = [np.zeros((2, 4, 3)), np.ones((2, 1, 3))]
    joined = concat_batches(states)
    assert joined.shape == (2, 5, 3) and joined[:, 4].all() and not joined[:, :4].any()
    assert concat_batches([np.zeros((4, 3)), np.ones((1, 3))]).shape == (5, 3)
    assert concat_batches([np.array(1.0), np.array(2.0)]).tolist() == [1.0, 2.0]
    equal = [np.zeros((2, 4, 3)), np.ones((2, 4, 3))]
    assert concat_batches(equal, counts=[4, 4]).shape == (2, 8, 3)  # the batch axis
    assert concat_batches(equal).shape == (4, 4, 3)  # no counts: axis 0
    ragged = concat_batches([np.zeros((2, 3)), np.zeros((3, 4))])
    assert ragged.dtype == object and ragged.shape == (2,)


def test_batch_within_fits_the_exposed_tensors_in_the_budget() -> None:
    from onnxopt.session import batch_within

    proto, _ = two_layer_model()
    model = from_proto(proto)
    source = from_arrays({"x": np.ones((40, 4), np.float32)}, "x")
    per_sample = (6 + 6) * 4  # h and r: six float32 each
    assert batch_within(model, ["h", "r"], source, 32, budget=10 * per_sample) == 10
    assert batch_within(model, ["h", "r"], source, 32, budget=10 ** 9) == 32
    assert batch_within(model, ["h", "r"], source, 32, budget=1) == 1
    # a batch the model fixes is kept: the size would be ignored anyway
    fixed = {"x": (1, 4)}
    assert batch_within(model, ["h", "r"], source, 32, input_shapes=fixed, budget=1) == 32


def test_sessions_do_not_spin_their_threads() -> None:
    from onnxopt.session import make_session
    from testmodels.structures import residual_blocks

    session = make_session(residual_blocks(width=8))
    entries = session.get_session_options().get_session_config_entry
    assert entries("session.intra_op.allow_spinning") == "0"
