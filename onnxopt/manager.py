"""PassManager: runs passes with snapshots, checks, onnxruntime validation and rollback."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import onnx
import onnx_ir as ir

from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import FeedSource, input_specs
from onnxopt.errors import DataError, UserError
from onnxopt.ir import clone_model
from onnxopt.large_weights import call_without_weights
from onnxopt.model_io import serialized_size
from onnxopt.pass_base import Pass, PassContext
from onnxopt.report import PassRecord, RunReport, Snapshot, Status
from onnxopt.shapes import resolve_input_shapes
from onnxopt.validation import Gates, Validator

logger = logging.getLogger(__name__)

#: Without ``--eval``, every this-many-th calibration sample is held out for validation.
HOLDOUT_EVERY = 4
#: Calibration sets smaller than this are not split (too few to hold samples out).
MIN_SAMPLES_TO_HOLD_OUT = 8


class Instrumentation(Protocol):
    """Hooks around each pass (timing, dumps, custom checks). All are optional no-ops."""

    def before_pass(self, pass_: Pass, model: ir.Model) -> None: ...

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None: ...

    def pass_failed(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None: ...


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
                          progress=self.show_progress, dry_run=self.dry_run,
                          quality_floor=self.gates.floor())
        validator = None
        if self.validate:
            validator = Validator(model, self, validation)
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
                                    dataclasses.replace(report.final), 0.0,
                                    message="not run (no plan mode)")
                as_real_run = False
            else:
                # the model a pass starts from is the one the last record describes
                model, record = self._run_one(pass_, model, ctx, validator,
                                              dataclasses.replace(report.final))
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
                 validator: Validator | None, before: Snapshot,
                 ) -> tuple[ir.Model, PassRecord]:
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
            record = PassRecord(repr(pass_), pass_.exact, Status.CRASHED, before,
                                time.perf_counter() - start,
                                message=f"crashed (the model before it is kept): {text[:300]}")
            self._notify_failed(pass_, snapshot, record)
            return snapshot, record
        exact = pass_.exact if result.exact is None else result.exact
        status = Status.KEPT if result.modified else Status.UNCHANGED
        record = PassRecord(repr(pass_), exact, status, before, 0.0,
                            stats=result.stats,
                            refusals=list(result.refusals), summary=result.summary,
                            plan=result.plan, promised_agreement=result.promised_agreement,
                            promise_caveat=result.promise_caveat)
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
        record.message = message  # record.after is still the snapshot's
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
