"""Validation of each stage: reference outputs, the runtime noise floor, gates and the floor.

The pass manager hands every rewritten model to a :class:`Validator`, which runs it on the
validation samples and compares it with the previous stage and the original.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.compare import (
    Comparison,
    QualityFloor,
    accuracy_of,
    as_comparable,
    compare_outputs,
    runtime_noise,
    scaled_tolerance,
)
from onnxopt.data import FeedSource, input_specs, sample_count
from onnxopt.errors import ModelError
from onnxopt.large_weights import release_mapped_weights
from onnxopt.pass_base import Pass, PassResult
from onnxopt.report import PassRecord, Status
from onnxopt.session import concat_batches, make_session, sample_axis, stream

if TYPE_CHECKING:
    from onnxopt.manager import PassManager

logger = logging.getLogger(__name__)

#: Validation samples drawn at random when the user gives no data.
DEFAULT_RANDOM_SAMPLES = 16
#: Exact passes are validated on this many samples (the first of the validation set).
EXACT_SAMPLES = 16
#: An exact rewrite may differ from the previous stage by this many times the runtime's
#: own noise (onnxruntime with all graph optimizations against none, on the same data).
NOISE_MULTIPLE = 8.0


@dataclass
class Gates:
    """Limits on lossy passes, checked against the original model.

    Every lossy pass is held to a quality floor (:class:`~onnxopt.compare.QualityFloor`):
    top-1 agreement for classifier-like outputs, SQNR for other float outputs. The
    defaults apply unless ``quality_floor`` is False; ``min_agreement`` and
    ``min_sqnr_db`` replace them (and still apply without the default floor).

    Attributes:
        min_agreement: Lowest allowed top-1 agreement with the original model.
        max_accuracy_drop: Largest allowed accuracy drop (fraction, 0.01 = 1 point); needs
            labelled validation data.
        min_sqnr_db: Lowest allowed SQNR (dB) of non-classifier float outputs.
        quality_floor: Whether the default floor applies where no value is given.
    """

    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    min_sqnr_db: float | None = None
    quality_floor: bool = True

    def floor(self) -> QualityFloor:
        """The floor in force: defaults, replaced by the values the user gave."""
        default = QualityFloor() if self.quality_floor else QualityFloor(0.0, -np.inf)
        return QualityFloor(
            default.min_agreement if self.min_agreement is None else self.min_agreement,
            default.min_sqnr_db if self.min_sqnr_db is None else self.min_sqnr_db,
            agreement_given=self.min_agreement is not None,
            sqnr_given=self.min_sqnr_db is not None)


class Validator:
    """Holds the reference outputs and compares each stage against them.

    Lossy passes are judged on every validation sample; exact passes on the first
    ``EXACT_SAMPLES`` of them, with a tolerance widened to ``NOISE_MULTIPLE`` times the
    runtime's own noise on those samples. The previous stage's outputs are kept, so a
    pass costs one run of the new model.
    """

    def __init__(self, model: ir.Model, manager: PassManager,
                 validation: FeedSource | None) -> None:
        from onnxopt.data import random_source

        self.manager = manager
        if validation is not None:
            self.source = validation
        else:
            self.source = random_source(input_specs(model, manager.input_shapes),
                                        DEFAULT_RANDOM_SAMPLES, manager.seed)
            if any(not p.exact for p in manager.passes):
                logger.warning("no --eval or --calib: lossy passes are validated on %d random "
                               "samples, which are not representative of real inputs",
                               DEFAULT_RANDOM_SAMPLES)
        self.limit = manager.max_samples
        if self.limit is None and validation is not None and validation is not manager.validation:
            self.limit = 256  # validating on (part of) the calibration data: a bounded run
        self.specs = input_specs(model, manager.input_shapes)
        self.output_names = [v.name or "" for v in model.graph.outputs]
        outputs, labels, samples = self._run(model, "validating original", original=True)
        self.original = outputs
        self.previous = outputs
        self.labels = labels
        self.samples = samples
        self.original_accuracy = accuracy_of(outputs, labels) if labels is not None else None
        self.exact_samples = min(EXACT_SAMPLES, samples)
        # Exact passes run on the first samples only; their reference is a run on the same
        # samples (an output without a sample axis, such as an RNN state, depends on them all).
        self.original_head = self._head_of(model, outputs)
        self.previous_head = self.original_head
        self.noise: list[float] | None = None
        if any(p.exact for p in manager.passes):
            try:
                plain, _, _ = self._run(model, "measuring runtime noise",
                                        limit=self.exact_samples,
                                        optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
                self.noise = runtime_noise(self.original_head, plain)
            except Exception as exc:  # noqa: BLE001 - the floor is an aid, not a requirement
                logger.info("could not measure the runtime's noise floor: %s", exc)

    def _head_of(self, model: ir.Model, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """``model``'s outputs on the samples exact passes are judged on.

        Sliced from the full run when every output has a sample axis; else run anew.
        """
        if self.exact_samples == self.samples:
            return outputs
        if all(sample_axis(o, self.samples) is not None for o in outputs):
            return [_rows(o, self.exact_samples, self.samples) for o in outputs]
        head, _, _ = self._run(model, "validating (first samples)", limit=self.exact_samples)
        return head

    def _run(self, model: ir.Model, desc: str, original: bool = False,
             limit: int | None = None,
             optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             ) -> tuple[list[np.ndarray], np.ndarray | None, int]:
        try:
            session = make_session(model, graph_optimization=optimization)
        except Exception as exc:  # e.g. an opset or IR version newer than onnxruntime knows
            if not original:
                raise
            text = " ".join(str(exc).split())
            text = text if len(text) <= 200 else "..." + text[-200:]
            raise ModelError(f"onnxruntime cannot run the input model, so rewrites cannot be "
                             f"validated (--no-validate skips validation): {text}") from None
        chunks: list[list[np.ndarray]] = []
        label_parts: list[np.ndarray] = []
        counts: list[int] = []
        for feeds, labels, (outputs,) in stream([session], self.source, self.specs,
                                                batch_size=self.manager.batch_size,
                                                limit=self.limit if limit is None else limit,
                                                show_progress=self.manager.show_progress,
                                                desc=desc, data_errors=original):
            chunks.append([as_comparable(o) for o in outputs])
            if labels is not None:
                label_parts.append(labels)
            counts.append(sample_count(feeds, self.specs))
        count = sum(counts)
        outputs = [concat_batches([c[i] for c in chunks], counts) for i in range(len(chunks[0]))]
        labels = np.concatenate(label_parts) if len(label_parts) == len(chunks) else None
        del session  # it may hold views of memory-mapped weights
        release_mapped_weights(model)
        return outputs, labels, count

    def check(self, pass_: Pass, model: ir.Model, result: PassResult, record: PassRecord,
              exact: bool, gates: Gates) -> tuple[Status, str] | None:
        """Compare ``model`` with the previous stage; returns (status, message) on failure."""
        names = [v.name or "" for v in model.graph.outputs]
        if names != self.output_names:
            return Status.ROLLED_BACK, (f"graph outputs changed from {self.output_names} to "
                                        f"{names}, rolled back")
        limit = self.exact_samples if exact else None
        try:
            outputs, _, _ = self._run(model, f"validating {pass_.name}", limit=limit)
        except Exception as exc:  # onnxruntime refused the rewritten model
            return Status.ROLLED_BACK, f"onnxruntime cannot run the result, rolled back: {exc}"
        tol = scaled_tolerance(pass_.tolerance, self.previous)
        if exact:
            labels = None if self.labels is None else self.labels[: self.exact_samples]
            noise: dict = dict(noise=self.noise, noise_multiple=NOISE_MULTIPLE)
            record.vs_previous = compare_outputs(self.previous_head, outputs, names,
                                                 tol, labels, **noise)
            record.vs_original = compare_outputs(self.original_head, outputs, names,
                                                 tol, labels, **noise)
            if not record.vs_previous:
                return Status.ROLLED_BACK, ("exact pass changed the outputs, rolled back: "
                                            + record.vs_previous.summary())
            self.previous_head = outputs
            self.previous = [_replace_rows(p, o, self.samples)
                             for p, o in zip(self.previous, outputs, strict=True)]
            if self.labels is not None:  # the other rows are the equivalent previous stage's
                record.vs_original.accuracy = accuracy_of(self.previous, self.labels)
            return None
        record.vs_previous = compare_outputs(self.previous, outputs, names, tol, self.labels)
        record.vs_original = compare_outputs(self.original, outputs, names, tol, self.labels)
        message = gate_message(record.vs_original, gates, self.original_accuracy)
        if message is not None:
            return Status.GATE_FAILED, message + ", rolled back"
        self.previous = outputs
        self.previous_head = self._head_of(model, outputs)
        return None


def _rows(output: np.ndarray, n: int, samples: int) -> np.ndarray:
    """The first ``n`` samples of a batched output (unbatched outputs are returned whole)."""
    axis = sample_axis(output, samples)
    return output if axis is None else output[(slice(None),) * axis + (slice(0, n),)]


def _replace_rows(previous: np.ndarray, head: np.ndarray, samples: int) -> np.ndarray:
    """``previous`` with its first rows replaced by ``head`` (the rows an exact pass ran).

    An output without a sample axis keeps the full run's value: the exact pass matched it on
    the first samples, so the previous full-run value stands for the new stage too.
    """
    axis = sample_axis(previous, samples)
    if head.shape == previous.shape:
        return head
    if axis is None:
        return previous
    merged = previous.copy()
    merged[(slice(None),) * axis + (slice(0, head.shape[axis]),)] = head
    return merged


def gate_message(cmp: Comparison, gates: Gates, original_accuracy: float | None) -> str | None:
    violation = gates.floor().violation(cmp)
    if violation is not None:
        return violation
    if gates.max_accuracy_drop is not None and cmp.accuracy is not None \
            and original_accuracy is not None:
        drop = original_accuracy - cmp.accuracy
        if drop > gates.max_accuracy_drop:
            return (f"accuracy dropped {drop:.4f} ({100 * drop:.2f} points), more than "
                    f"--max-accuracy-drop {gates.max_accuracy_drop:g}")
    return None


