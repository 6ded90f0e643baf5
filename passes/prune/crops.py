"""Crops of large calibration images, for the measurements that run the model many times.

``prune``'s sensitivity measurement runs a refitted copy of the model for every probe (about
three per group), and each run costs as many pixels as the calibration images have: on a text
detector at 640x640 the measurement alone took most of an hour. A fully convolutional model
(its image input's height and width are dynamic) computes every output location from a
window around it, so the relative change of its output under a pruning plan can be measured
on crops as well as on whole images: the measurements then run on one random
:data:`CROP` x :data:`CROP` window of each calibration image (the same window for every
probe, so probes are compared on the same pixels). A crop's border sees zero padding where
the image had content, and a global pooling averages the crop, not the image; both change
the reference and the probes alike. The final refit and the scoring statistics still use
the whole images.

Crops are taken only when the model has one image input (4-D, float, dynamic height and
width), the images are at least twice the crop in both directions, and the model runs on a
crop (checked on one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.feeds import Chunk, FeedSource, input_specs
from onnxopt.session import make_session

logger = logging.getLogger(__name__)

__all__ = ["CROP", "crop_source"]

CROP = 160
"""Side of the crops (a multiple of 32, the largest stride of common detectors)."""


def _image_input(model: ir.Model) -> str | None:
    """The name of the model's only input if it is a float image with dynamic H and W."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(inputs) != 1:
        return None
    value = inputs[0]
    if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
        return None
    shape = value.shape
    if shape is None or len(shape) != 4 or any(isinstance(d, int) for d in shape[2:]):
        return None
    return value.name


def _crops(source: FeedSource, name: str, side: int, seed: int) -> Iterator[Chunk]:
    start = 0
    for feeds, labels in source.chunks():
        images = np.asarray(feeds[name])
        out = np.empty((*images.shape[:2], side, side), images.dtype)
        for i in range(len(images)):
            rng = np.random.default_rng([seed, start + i])
            top = int(rng.integers(0, images.shape[2] - side + 1))
            left = int(rng.integers(0, images.shape[3] - side + 1))
            out[i] = images[i, :, top:top + side, left:left + side]
        start += len(images)
        yield {**feeds, name: out}, labels


def crop_source(model: ir.Model, source: FeedSource,
                input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                seed: int = 0) -> tuple[FeedSource, dict[str, tuple[int, ...]]] | None:
    """``(crops of source, input shapes for them)``, or None when crops do not apply.

    Args:
        model: The model.
        source: Its calibration feeds.
        input_shapes: The concrete input shapes given for the whole images.
        seed: Seed of the crop positions.
    """
    name = _image_input(model)
    if name is None:
        return None
    specs = input_specs(model, input_shapes)
    try:
        first, _ = next(iter(source.batches(specs, 1, 1)))
    except Exception:  # no samples or data that does not fit: the caller reports it
        return None
    image = np.asarray(first[name])
    if image.ndim != 4 or min(image.shape[2:]) < 2 * CROP:
        return None

    def chunks() -> Iterator[Chunk]:
        return _crops(source, name, CROP, seed)

    cropped = FeedSource(chunks, f"{source.description} ({CROP}x{CROP} crops)",
                         source.num_samples, source.representative)
    shapes = {k: v for k, v in (input_shapes or {}).items() if k != name}
    try:  # the model must run on a crop (a Reshape to a fixed size would not)
        sample, _ = next(iter(cropped.batches(input_specs(model, shapes), 1, 1)))
        make_session(model).run(None, {name: sample[name]})
    except Exception as exc:  # noqa: BLE001 - any failure means: measure on whole images
        logger.info("measuring on whole images: the model does not run on %dx%d crops (%s)",
                    CROP, CROP, exc)
        return None
    return cropped, shapes
