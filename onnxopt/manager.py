"""PassManager: runs passes with snapshots, checks, onnxruntime validation and rollback."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
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
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import FeedSource, input_specs, sample_count
from onnxopt.errors import DataError, ModelError, UserError
from onnxopt.ir import call_without_weights, clone_model, release_mapped_weights
from onnxopt.model_io import serialized_size
from onnxopt.pass_base import Pass, PassContext, PassResult
from onnxopt.report import PassRecord, RunReport, Snapshot, Status
from onnxopt.session import concat_batches, make_session, sample_axis, stream
from onnxopt.shapes import resolve_input_shapes

logger = logging.getLogger(__name__)

#: Validation samples drawn at random when the user gives no data.
DEFAULT_RANDOM_SAMPLES = 16
#: Exact passes are validated on this many samples (the first of the validation set).
EXACT_SAMPLES = 16
#: An exact rewrite may differ from the previous stage by this many times the runtime's
#: own noise (onnxruntime with all graph optimizations against none, on the same data).
NOISE_MULTIPLE = 8.0
#: Without ``--eval``, every this-many-th calibration sample is held out for validation.
HOLDOUT_EVERY = 4
#: Calibration sets smaller than this are not split (too few to hold samples out).
MIN_SAMPLES_TO_HOLD_OUT = 8


class Instrumentation(Protocol):
    """Hooks around each pass (timing, dumps, custom checks). All are optional no-ops."""

    def before_pass(self, pass_: Pass, model: ir.Model) -> None: ...

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None: ...

    def pass_failed(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None: ...


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


class PassManager:
    """Runs a pipeline of passes on one model.

    For each pass: snapshot, run, and if the model changed: ``onnx.checker``, shape
    inference, onnxruntime on the validation feeds and comparison with the previous
    stage. A failing exact pass is rolled back; a lossy pass is measured and gated.

    Args:
        passes: The passes, in order.
        validation: Feeds to compare outputs on (None with ``validate`` = random data).
        calib: Calibration feeds handed to passes.
        validate: False skips checks and onnxruntime comparison entirely.
        gates: Limits for lossy passes.
        batch_size: Batch for validation runs when the batch axis is dynamic.
        max_samples: Cap on validation samples.
        input_shapes: Concrete shapes for dynamic inputs.
        progress: Show progress bars (only on a terminal).
        instruments: Extra hooks.
        seed: Seed for random validation data and for passes.
        dry_run: Passes that support it only report their plan (``PassContext.dry_run``);
            exact passes before the first plan run, the others do not (``Status.NOT_RUN``).
    """

    def __init__(self, passes: Sequence[Pass], *, validation: FeedSource | None = None,
                 calib: FeedSource | None = None, validate: bool = True,
                 gates: Gates | None = None, batch_size: int = 32,
                 max_samples: int | None = None,
                 input_shapes: dict[str, tuple[int, ...]] | None = None,
                 progress: bool = False, instruments: Sequence[Instrumentation] = (),
                 seed: int = 0, dry_run: bool = False) -> None:
        self.passes = list(passes)
        self.validation = validation
        self.calib = calib
        self.validate = validate
        self.gates = gates or Gates()
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.input_shapes = dict(input_shapes or {})
        self.show_progress = progress
        self.instruments = list(instruments)
        self.seed = seed
        self.dry_run = dry_run

    def run(self, model: ir.Model) -> tuple[ir.Model, RunReport]:
        """Run every pass; returns the final model and the report.

        Raises:
            UserError: A pass needs calibration data that was not given, the data does not
                fit the model, or a gate needs labels the validation data lacks.
        """
        for p in self.passes:
            if p.requires_data() and self.calib is None:
                raise UserError(p.missing_data_message())
        specs = input_specs(model, self.input_shapes)
        self._check_sample_count(self.calib, specs)
        calib, validation, data_note = self._split_data(specs)
        self._check_gates(validation)
        model = infer_shapes(model)
        # costs are per sample at concrete shapes: --input-shape, else the data's
        self._cost_shapes = resolve_input_shapes(model, self.input_shapes, (calib, validation))
        report = RunReport(original=_snapshot(model, self._cost_shapes))
        ctx = PassContext(calib=calib, input_shapes=self.input_shapes, seed=self.seed,
                          progress=self.show_progress, dry_run=self.dry_run)
        validator = None
        if self.validate:
            validator = _Validator(model, self, validation)
            report.original_accuracy = validator.original_accuracy
            report.validated_samples = validator.samples
            report.validation_source = validator.source.description
            report.noise_floor = validator.noise
            report.quality_floor = self.gates.floor().describe()
            report.validation_note = data_note
        # A dry run rewrites only while the model is the one a real run would have: exact
        # passes up to the first plan run (the plan must see what it would prune), a lossy
        # pass without a plan mode never runs, and nothing runs after a plan but more plans.
        as_real_run = True
        for pass_ in self.passes:
            if self.dry_run and not pass_.supports_dry_run \
                    and not (pass_.exact and as_real_run):
                record = PassRecord(repr(pass_), pass_.exact, Status.NOT_RUN,
                                    _snapshot(model, self._cost_shapes), 0.0,
                                    message="not run (no plan mode)")
                as_real_run = False
            else:
                model, record = self._run_one(pass_, model, ctx, validator)
                as_real_run = as_real_run and not (self.dry_run and pass_.supports_dry_run)
            report.records.append(record)
        return model, report

    def _split_data(self, specs: list) -> tuple[FeedSource | None, FeedSource | None,
                                                 str | None]:
        """(calibration, validation, note): hold validation samples out of the calibration.

        Without ``--eval``, a pipeline whose passes learn from the calibration data is
        validated on every ``HOLDOUT_EVERY``-th calibration sample, which the passes never
        see, so the gates judge what the passes did on data they did not fit.
        """
        calib, validation = self.calib, self.validation
        if not self.validate:
            return calib, validation, None
        if validation is not None:
            if calib is None:
                return calib, validation, None
            return calib, validation, (f"passes calibrated on {calib.description}; "
                                       f"validated on {validation.description}")
        learns = any(p.requires_data() or not p.exact for p in self.passes)
        if calib is None:
            return calib, None, None
        if not learns:  # nothing is fitted to the calibration data: validate on all of it
            return calib, calib, None
        count = calib.count(specs)
        need = max(MIN_SAMPLES_TO_HOLD_OUT, max(p.min_samples for p in self.passes))
        fit_count = count - -(-count // HOLDOUT_EVERY)
        if not calib.rebatch or fit_count < need:
            why = ("its runs are fed as given" if not calib.rebatch
                   else f"{_samples(count)} are too few to hold any out")
            logger.warning("validating on the calibration samples themselves (%s): the "
                           "metrics are optimistic; give --eval DATA for honest ones", why)
            return calib, calib, (f"validated on the samples the passes calibrated on "
                                  f"({why}); give --eval for held-out metrics")
        fit, held = calib.holdout(HOLDOUT_EVERY)
        return fit, held, (f"validated on {_samples(held.num_samples or 0)} held out of "
                           f"{calib.description} (every {HOLDOUT_EVERY}th, never seen by the "
                           f"passes); passes calibrated on the other "
                           f"{_samples(fit.num_samples or 0)}")

    def _check_gates(self, validation: FeedSource | None) -> None:
        """Refuse gates that cannot be checked, before any work is done."""
        if self.gates.max_accuracy_drop is None:
            return
        if not self.validate:
            raise UserError("--max-accuracy-drop needs validation; drop --no-validate")
        source = validation or self.calib
        if source is None or not _has_labels(source):
            where = "random data" if source is None else source.description
            raise DataError(f"--max-accuracy-drop needs labelled validation data, but {where} "
                            f"has no 'labels'; give --eval DATA with a 'labels' array, or "
                            f"gate on --min-agreement instead")

    def _check_sample_count(self, calib: FeedSource | None, specs: list) -> None:
        """Refuse calibration data with fewer samples than a pass of the pipeline needs."""
        need = max((p.min_samples for p in self.passes), default=1)
        if calib is None or need <= 1:
            return
        have = calib.count(specs)
        if have < need:
            name = next(p for p in self.passes if p.min_samples == need)
            raise DataError(f"pass {name!r} needs at least {need} calibration samples; "
                            f"{calib.description} has {have}")

    def _run_one(self, pass_: Pass, model: ir.Model, ctx: PassContext,
                 validator: _Validator | None) -> tuple[ir.Model, PassRecord]:
        for hook in self.instruments:
            hook.before_pass(pass_, model)
        snapshot = clone_model(model)
        start = time.perf_counter()
        try:
            result = pass_.run(model, ctx)
        except UserError:
            raise
        except Exception as exc:  # a crashing pass must not lose the user's model
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            logger.error("pass %s crashed (a bug; -v shows the traceback): %s", pass_,
                         text[:300])
            logger.info("traceback of the crash in pass %s", pass_, exc_info=True)
            record = PassRecord(repr(pass_), pass_.exact, Status.CRASHED,
                                _snapshot(snapshot, self._cost_shapes),
                                time.perf_counter() - start,
                                message=f"crashed (the model before it is kept): {text[:300]}")
            self._notify_failed(pass_, snapshot, record)
            return snapshot, record
        exact = pass_.exact if result.exact is None else result.exact
        status = Status.KEPT if result.modified else Status.UNCHANGED
        record = PassRecord(repr(pass_), exact, status,
                            _snapshot(snapshot, self._cost_shapes), 0.0,
                            stats=result.stats,
                            refusals=list(result.refusals), summary=result.summary,
                            plan=result.plan)
        if result.modified:
            problem = _structural_problem(model) if self.validate else None
            if problem is not None:
                return self._roll_back(pass_, snapshot, record, start,
                                       f"invalid model, rolled back: {problem}")
            model = infer_shapes(model)
            if validator is not None:
                failure = validator.check(pass_, model, result, record, exact, self.gates)
                if failure is not None:
                    status, message = failure
                    record.status = status
                    return self._roll_back(pass_, snapshot, record, start, message)
            record.after = _snapshot(model, self._cost_shapes)
        record.seconds = time.perf_counter() - start
        for hook in self.instruments:
            hook.after_pass(pass_, model, record)
        return model, record

    def _roll_back(self, pass_: Pass, snapshot: ir.Model, record: PassRecord, start: float,
                   message: str) -> tuple[ir.Model, PassRecord]:
        if record.status is not Status.GATE_FAILED:
            record.status = Status.ROLLED_BACK
        record.message = message
        record.after = _snapshot(snapshot, self._cost_shapes)
        record.seconds = time.perf_counter() - start
        # A missed gate is an outcome the caller asked to be told about in the report (the
        # CLI prints it once, in the table); a rolled-back rewrite is a warning.
        log = logger.info if record.status is Status.GATE_FAILED else logger.warning
        log("pass %s: %s", record.name, message)
        self._notify_failed(pass_, snapshot, record)
        return snapshot, record

    def _notify_failed(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None:
        for hook in self.instruments:
            hook.pass_failed(pass_, model, record)


class _Validator:
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
        message = _gate_message(record.vs_original, gates, self.original_accuracy)
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


def _gate_message(cmp: Comparison, gates: Gates, original_accuracy: float | None) -> str | None:
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


def _has_labels(source: FeedSource) -> bool:
    """Whether ``source`` carries labels (looks at its first chunk only)."""
    for _, labels in source.chunks():
        return labels is not None
    return False


def _samples(n: int) -> str:
    return f"{n} sample" + ("" if n == 1 else "s")


def _check_structure(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _structural_problem(model: ir.Model) -> str | None:
    """Run the ONNX checker and strict shape inference; a message if either fails.

    Large weights are left out of the proto they check (no second copy of the weights,
    any model size, external data not resolved against the working directory).
    """
    try:
        call_without_weights(_check_structure, model)
    except Exception as exc:  # the checker raises several types
        text = str(exc).strip().splitlines()
        return text[0][:300] if text else type(exc).__name__
    return None


def _snapshot(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> Snapshot:
    cost = model_cost(model, input_shapes)
    return Snapshot(nodes=cost.nodes, params=cost.params, macs=cost.macs,
                    bytes=serialized_size(model), macs_unknown=cost.macs_unknown)
