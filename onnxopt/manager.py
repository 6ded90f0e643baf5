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

from onnxopt.compare import (
    Comparison,
    accuracy_of,
    as_comparable,
    compare_outputs,
    scaled_tolerance,
)
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import FeedSource, input_specs, sample_count
from onnxopt.errors import DataError, ModelError, UserError
from onnxopt.ir import call_without_weights, clone_model, release_mapped_weights
from onnxopt.model_io import serialized_size
from onnxopt.pass_base import Pass, PassContext, PassResult
from onnxopt.report import PassRecord, RunReport, Snapshot, Status
from onnxopt.session import concat_batches, make_session, stream

logger = logging.getLogger(__name__)

#: Validation samples drawn at random when the user gives no data.
DEFAULT_RANDOM_SAMPLES = 16


class Instrumentation(Protocol):
    """Hooks around each pass (timing, dumps, custom checks). All are optional no-ops."""

    def before_pass(self, pass_: Pass, model: ir.Model) -> None: ...

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None: ...

    def pass_failed(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None: ...


@dataclass
class Gates:
    """Limits on lossy passes, checked against the original model.

    Attributes:
        min_agreement: Lowest allowed top-1 agreement with the original model.
        max_accuracy_drop: Largest allowed accuracy drop (fraction, 0.01 = 1 point).
    """

    min_agreement: float | None = None
    max_accuracy_drop: float | None = None


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
            UserError: A pass needs calibration data that was not given, or the data
                does not fit the model.
        """
        for p in self.passes:
            if p.needs_data and self.calib is None:
                raise UserError(f"pass {p!r} needs calibration data; give --calib DATA")
        self._check_sample_count(model)
        model = infer_shapes(model)
        report = RunReport(original=_snapshot(model))
        ctx = PassContext(calib=self.calib, input_shapes=self.input_shapes, seed=self.seed,
                          progress=self.show_progress, dry_run=self.dry_run)
        validator = None
        if self.validate:
            validator = _Validator(model, self)
            report.original_accuracy = validator.original_accuracy
            report.validated_samples = validator.samples
            report.validation_source = validator.source.description
        # A dry run rewrites only while the model is the one a real run would have: exact
        # passes up to the first plan run (the plan must see what it would prune), a lossy
        # pass without a plan mode never runs, and nothing runs after a plan but more plans.
        as_real_run = True
        for pass_ in self.passes:
            if self.dry_run and not pass_.supports_dry_run \
                    and not (pass_.exact and as_real_run):
                record = PassRecord(repr(pass_), pass_.exact, Status.NOT_RUN, _snapshot(model),
                                    0.0, message="not run (no plan mode)")
                as_real_run = False
            else:
                model, record = self._run_one(pass_, model, ctx, validator)
                as_real_run = as_real_run and not (self.dry_run and pass_.supports_dry_run)
            report.records.append(record)
        return model, report

    def _check_sample_count(self, model: ir.Model) -> None:
        """Refuse calibration data with fewer samples than a pass of the pipeline needs."""
        need = max((p.min_samples for p in self.passes), default=1)
        if self.calib is None or need <= 1:
            return
        have = self.calib.count(input_specs(model, self.input_shapes))
        if have < need:
            name = next(p for p in self.passes if p.min_samples == need)
            raise DataError(f"pass {name!r} needs at least {need} calibration samples; "
                            f"{self.calib.description} has {have}")

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
            logger.exception("pass %r crashed; rolled back", pass_)
            record = PassRecord(repr(pass_), pass_.exact, Status.CRASHED, _snapshot(snapshot),
                                time.perf_counter() - start,
                                message=f"crashed, rolled back: {type(exc).__name__}: {exc}")
            self._notify_failed(pass_, snapshot, record)
            return snapshot, record
        exact = pass_.exact if result.exact is None else result.exact
        status = Status.KEPT if result.modified else Status.UNCHANGED
        record = PassRecord(repr(pass_), exact, status, _snapshot(snapshot), 0.0,
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
            record.after = _snapshot(model)
        record.seconds = time.perf_counter() - start
        for hook in self.instruments:
            hook.after_pass(pass_, model, record)
        return model, record

    def _roll_back(self, pass_: Pass, snapshot: ir.Model, record: PassRecord, start: float,
                   message: str) -> tuple[ir.Model, PassRecord]:
        if record.status is not Status.GATE_FAILED:
            record.status = Status.ROLLED_BACK
        record.message = message
        record.after = _snapshot(snapshot)
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
    """Holds the reference outputs and compares each stage against them."""

    def __init__(self, model: ir.Model, manager: PassManager) -> None:
        from onnxopt.data import random_source

        self.manager = manager
        if manager.validation is not None:
            self.source = manager.validation
        elif manager.calib is not None:
            self.source = manager.calib
        else:
            # Without user data, exact passes are still checked on random inputs; this is
            # not a representativeness claim, so no warning (the report names the source).
            self.source = random_source(input_specs(model, manager.input_shapes),
                                        DEFAULT_RANDOM_SAMPLES, manager.seed)
        self.limit = manager.max_samples
        if self.limit is None and self.source is manager.calib:
            self.limit = 256
        self.specs = input_specs(model, manager.input_shapes)
        self.output_names = [v.name or "" for v in model.graph.outputs]
        outputs, labels, samples = self._run(model, "validating original", original=True)
        self.original = outputs
        self.previous = outputs
        self.labels = labels
        self.samples = samples
        self.original_accuracy = accuracy_of(outputs, labels) if labels is not None else None

    def _run(self, model: ir.Model, desc: str, original: bool = False,
             ) -> tuple[list[np.ndarray], np.ndarray | None, int]:
        try:
            session = make_session(model)
        except Exception as exc:  # e.g. an opset or IR version newer than onnxruntime knows
            if not original:
                raise
            text = " ".join(str(exc).split())
            text = text if len(text) <= 200 else "..." + text[-200:]
            raise ModelError(f"onnxruntime cannot run the input model, so rewrites cannot be "
                             f"validated (--no-validate skips validation): {text}") from None
        chunks: list[list[np.ndarray]] = []
        label_parts: list[np.ndarray] = []
        count = 0
        for feeds, labels, (outputs,) in stream([session], self.source, self.specs,
                                                batch_size=self.manager.batch_size,
                                                limit=self.limit,
                                                show_progress=self.manager.show_progress,
                                                desc=desc):
            chunks.append([as_comparable(o) for o in outputs])
            if labels is not None:
                label_parts.append(labels)
            count += sample_count(feeds)
        outputs = [concat_batches([c[i] for c in chunks]) for i in range(len(chunks[0]))]
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
        try:
            outputs, _, _ = self._run(model, f"validating {pass_.name}")
        except Exception as exc:  # onnxruntime refused the rewritten model
            return Status.ROLLED_BACK, f"onnxruntime cannot run the result, rolled back: {exc}"
        tol = scaled_tolerance(pass_.tolerance, self.previous)
        record.vs_previous = compare_outputs(self.previous, outputs, names, tol, self.labels)
        record.vs_original = compare_outputs(self.original, outputs, names, tol, self.labels)
        if exact and not record.vs_previous:
            return Status.ROLLED_BACK, ("exact pass changed the outputs, rolled back: "
                                        + record.vs_previous.summary())
        if not exact:
            message = _gate_message(record.vs_original, gates, self.original_accuracy)
            if message is not None:
                return Status.GATE_FAILED, message + ", rolled back"
        self.previous = outputs
        return None


def _gate_message(cmp: Comparison, gates: Gates, original_accuracy: float | None) -> str | None:
    if gates.min_agreement is not None and cmp.agreement is not None \
            and cmp.agreement < gates.min_agreement:
        return (f"top-1 agreement {cmp.agreement:.4f} is below --min-agreement "
                f"{gates.min_agreement}")
    if gates.max_accuracy_drop is not None and cmp.accuracy is not None \
            and original_accuracy is not None:
        drop = original_accuracy - cmp.accuracy
        if drop > gates.max_accuracy_drop:
            return (f"accuracy dropped {drop:.4f} ({100 * drop:.2f} points), more than "
                    f"--max-accuracy-drop {gates.max_accuracy_drop}")
    return None


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


def _snapshot(model: ir.Model) -> Snapshot:
    cost = model_cost(model)
    return Snapshot(nodes=cost.nodes, params=cost.params, macs=cost.macs,
                    bytes=serialized_size(model))
