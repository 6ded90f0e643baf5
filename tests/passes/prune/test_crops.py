"""Crops of large calibration images for the sensitivity measurement, and when there are none."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.data import from_arrays, input_specs
from onnxopt.ir import from_proto
from onnxopt.passes.prune.crops import CROP, crop_source
from onnxopt.session import run_model
from testmodels.dynamic import with_input_dims
from testmodels.structures import flatten_gemm_head, residual_blocks

SIDE = 2 * CROP + 16


def _images(n: int = 5, side: int = SIDE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((n, 3, side, side)).astype(np.float32)}


def _dynamic(proto: onnx.ModelProto):
    return from_proto(with_input_dims(proto, ["N", 3, "H", "W"]))


def test_crops_are_windows_of_the_images_the_same_on_every_pass() -> None:
    model = _dynamic(residual_blocks(width=4))
    arrays = _images()
    found = crop_source(model, from_arrays(arrays, "test"), {"input": (1, 3, SIDE, SIDE)})
    assert found is not None
    source, shapes = found
    assert "input" not in shapes  # the model runs two crops at once: batches are free
    first = [f["input"] for f, _ in source.batches(input_specs(model, shapes), 2)]
    second = [f["input"] for f, _ in source.batches(input_specs(model, shapes), 2)]
    assert [len(b) for b in first] == [2, 2, 1]
    crops = np.concatenate(first)
    np.testing.assert_array_equal(crops, np.concatenate(second))
    assert crops.shape == (5, 3, CROP, CROP)
    for image, crop in zip(arrays["input"], crops, strict=True):
        windows = np.lib.stride_tricks.sliding_window_view(image[0], (CROP, CROP))
        hits = np.argwhere(np.all(windows == crop[0], axis=(2, 3)))
        assert len(hits) == 1
        top, left = hits[0]
        np.testing.assert_array_equal(crop, image[:, top:top + CROP, left:left + CROP])
    assert run_model(model, {"input": crops})[0].shape == (5, 10)


def test_no_crops_for_small_images_fixed_sizes_or_a_model_that_needs_the_whole_image() -> None:
    dynamic = _dynamic(residual_blocks(width=4))
    small = from_arrays(_images(side=2 * CROP - 16), "test")
    assert crop_source(dynamic, small) is None
    fixed = from_proto(residual_blocks(width=4, size=SIDE))  # static height and width
    assert crop_source(fixed, from_arrays(_images(), "test")) is None
    # a Flatten -> Gemm head takes only the size it was built for: it fails on a crop
    head = _dynamic(flatten_gemm_head(size=SIDE))
    images = from_arrays(_images(2), "test")
    assert run_model(head, {"input": _images(1)["input"]})[0].shape[0] == 1
    assert crop_source(head, images) is None
