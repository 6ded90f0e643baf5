"""The Python entry point: ``optimize(model, "cleanup,fold-bn", calib=...)``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt.data import open_feeds
from onnxopt.manager import Instrumentation, PassManager
from onnxopt.model_io import SOURCE_BYTES, load, save
from onnxopt.pass_base import Pass
from onnxopt.pipeline import parse_pipeline
from onnxopt.report import RunReport
from onnxopt.validation import Gates


def optimize(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    pipeline: str | Sequence[Pass],
    *,
    calib: Any = None,
    eval: Any = None,  # noqa: A002 - mirrors the CLI's --eval
    output: str | os.PathLike | None = None,
    validate: bool = True,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    min_sqnr_db: float | None = None,
    quality_floor: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    progress: bool = False,
    instruments: Sequence[Instrumentation] = (),
    seed: int = 0,
    dry_run: bool = False,
    cast_inputs: bool = False,
) -> tuple[ir.Model, RunReport]:
    """Optimize a model with a pipeline of passes, validating each rewrite.

    Args:
        model: Path, ``ModelProto`` or ``onnx_ir.Model`` (an ``onnx_ir.Model`` is
            rewritten in place).
        pipeline: A spec like ``"cleanup,fold-bn,prune(ratio=0.3)"`` or pass instances.
        calib: Calibration data for passes that need it: ``.npz`` path, folder of
            ``.npy``, ``"random:N"``, a ``CalibrationDataReader``, a dict of arrays, or an
            iterable of feed dicts.
        eval: Validation data (same forms; labels give accuracy). Without it, a pipeline
            that learns from ``calib`` is validated on every 4th calibration sample, held
            out from the passes; otherwise on ``calib``, then on ``random:16``.
        output: If given, the optimized model is written there atomically.
        validate: False skips checks and onnxruntime comparisons.
        min_agreement: Quality floor for classifier-like outputs: a lossy pass whose
            top-1 agreement with the original falls below it is rolled back (default 0.9).
        max_accuracy_drop: Gate for lossy passes (fraction, 0.01 = one point); needs
            labelled validation data.
        min_sqnr_db: Quality floor (dB) for other float outputs (default 10).
        quality_floor: False removes the default floor (explicit values still apply).
        input_shapes: Concrete shapes for dynamic inputs.
        batch_size: Validation batch size when the batch axis is dynamic.
        max_samples: Cap on validation samples.
        progress: Show progress bars on a terminal.
        instruments: Extra before/after-pass hooks.
        seed: Seed for random data and passes.
        dry_run: Passes that can plan without rewriting (``Pass.supports_dry_run``) only
            report their plan; exact passes before the first plan run, the others do not
            (status ``not run``). Give no ``output`` then.
        cast_inputs: Convert numeric data of any type to the model's input types, values
            as they are; by default integer data for a float input is an error (it must be
            normalised the way the model was trained) and float data of another width is
            cast with a note.

    Returns:
        The optimized model, an ``onnx_ir.Model`` (``onnxopt.save`` writes it,
        ``onnx_ir.to_proto`` makes it a ``ModelProto``), and the run report
        (``report.failures`` lists rolled-back passes and missed gates).
    """
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    loaded = load(model)
    calib_source = None if calib is None else open_feeds(
        calib, loaded, seed=seed, input_shapes=input_shapes, cast_inputs=cast_inputs)
    eval_source = None if eval is None else open_feeds(
        eval, loaded, seed=seed, input_shapes=input_shapes, cast_inputs=cast_inputs)
    manager = PassManager(
        passes, validation=eval_source, calib=calib_source, validate=validate,
        gates=Gates(min_agreement, max_accuracy_drop, min_sqnr_db, quality_floor),
        batch_size=batch_size,
        max_samples=max_samples, input_shapes=input_shapes, progress=progress,
        instruments=instruments, seed=seed, dry_run=dry_run)
    # Read from a file and not yet rewritten (the pass manager rewrites it in place).
    source_bytes = loaded.meta.pop(SOURCE_BYTES, None)
    result, report = manager.run(loaded)
    if source_bytes is not None:  # read from a file: its size, as `onnxopt info` shows it
        report.original.bytes = source_bytes
    if output is not None:
        report.output_path = os.fspath(save(result, output))
    return result, report
