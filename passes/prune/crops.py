"""Crops of large calibration images, for prune's sensitivity measurement.

The sensitivity measurement runs a refitted copy of the model for every probe (about three
per group). A fully convolutional model (its image input's height and width are dynamic)
computes every output location from a window around it, so the relative change of its output
under a pruning plan can be measured on crops as well as on whole images: :func:`crop_source`
gives one random :data:`CROP` x :data:`CROP` window of each calibration image (the same
window for every probe, so probes are compared on the same pixels), and lets them run in
batches when the model takes a batch of two (``--input-shape x:1x3x640x640`` fixes the batch
of the whole images at 1). A crop's border sees zero padding where the image had content, and
a global pooling averages the crop, not the image; both change the reference and the probes
alike. On the PP-OCRv4 detector at 640x640 the plans measured on crops were as good as those
measured on whole images (output SQNR over three seeds 11.3-15.5 dB against 11.1-14.0 dB) at
a quarter of the time. The crops are kept in memory (at most a quarter of the images' size);
the scoring statistics and the final refit use the whole images.
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


def _runs_batch(model: ir.Model, source: FeedSource,
                input_shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the model runs two samples of ``source`` at once (two in, two out)."""
    try:
        feeds, _ = next(iter(source.batches(input_specs(model, input_shapes), 2, 2)))
        if any(np.asarray(v).shape[0] != 2 for v in feeds.values()):
            return False
        outputs = make_session(model).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the batch of one
        logger.debug("prune: keeping batches of one (%s)", exc)
        return False
    return all(np.asarray(o).ndim and np.asarray(o).shape[0] == 2 for o in outputs)


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

    Crops are taken when the model has one image input (4-D, float, dynamic height and
    width, samples on axis 0), the images are at least twice :data:`CROP` in both
    directions, and the model runs on a crop (checked on one, and on two at once to batch
    them).

    Args:
        model: The model.
        source: Its calibration feeds.
        input_shapes: The concrete input shapes given for the whole images.
        seed: Seed of the crop positions.
    """
    name = _image_input(model)
    if name is None or not source.rebatch or source.layout.axis(name) != 0:
        return None
    try:
        first, _ = next(iter(source.batches(input_specs(model, input_shapes), 1, 1)))
    except Exception:  # noqa: BLE001 - no samples or data that does not fit: reported elsewhere
        return None
    image = np.asarray(first[name])
    if image.ndim != 4 or min(image.shape[2:]) < 2 * CROP:
        return None
    kept: list[Chunk] = []

    def chunks() -> Iterator[Chunk]:  # cropped once: the measurements read them many times
        if not kept:
            kept.extend(_crops(source, name, CROP, seed))
        return iter(kept)

    cropped = FeedSource(chunks, f"{source.description} ({CROP}x{CROP} crops)",
                         source.num_samples, source.representative, layout=source.layout,
                         cast_inputs=source.cast_inputs)
    free = {k: v for k, v in (input_shapes or {}).items() if k != name}
    if _runs_batch(model, cropped, free):
        return cropped, free
    one = (1, *image.shape[1:2], CROP, CROP)
    try:  # the model must run on a crop (a Reshape to a fixed size would not)
        sample, _ = next(iter(cropped.batches(input_specs(model, {name: one}), 1, 1)))
        make_session(model).run(None, {name: sample[name]})
    except Exception as exc:  # noqa: BLE001 - any failure means: measure on whole images
        logger.info("measuring on whole images: the model does not run on %dx%d crops (%s)",
                    CROP, CROP, exc)
        return None
    return cropped, {**free, name: one}
