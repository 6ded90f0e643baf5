"""Corpus self-check: run passes over the ONNX operator test models and real model dirs.

``python -m onnxopt.selfcheck [--sample K] [--passes a,b] [--json OUT]`` runs every exact
pass (and ``quantize`` with calibration on the case's own inputs) on each model of the
corpus that onnxruntime can run, and classifies what happened:

- ``kept``: changed, outputs preserved within the pass tolerance (or lossy and reported);
- ``unchanged`` / ``declined``: nothing to do, or matches refused with reasons;
- ``rolled back``: the manager's validation caught a change and undid it (reported);
- ``crashed``: the pass raised; ``invalid``: the result fails ``onnx.checker``;
- ``silent``: an exact pass was kept but an independent re-run disagrees with the original.

The corpus is every node test case of ``onnx.backend.test.case.node.collect_testcases`` plus
the model folders shipped under ``onnx/backend/test/data`` that carry their model file.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.compare import as_comparable, compare_outputs, scaled_tolerance
from onnxopt.data import from_iterable, input_specs, random_source
from onnxopt.errors import UserError
from onnxopt.ir import to_proto
from onnxopt.manager import PassManager
from onnxopt.model_io import load
from onnxopt.pass_base import get_pass, registered_passes
from onnxopt.progress import progress
from onnxopt.report import Status
from onnxopt.session import make_session

logger = logging.getLogger(__name__)

#: Passes whose selfcheck needs calibration data; they get the case's own inputs.
_CALIBRATED = ("quantize",)
#: Passes that only make sense with a trained classifier and real data.
_EXCLUDED = ("early-exit", "prune")


@dataclass
class Case:
    """One corpus model and the feeds to run it on."""

    name: str
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]


@dataclass
class Outcome:
    """What one pass did to one case."""

    case: str
    pass_name: str
    verdict: str
    detail: str = ""


def default_passes() -> list[str]:
    """Every registered exact pass, plus the calibrated lossy ones."""
    names = []
    for name, cls in registered_passes().items():
        if name in _EXCLUDED or name.startswith("test-"):
            continue
        if cls.exact or name in _CALIBRATED:
            names.append(name)
    return names


def node_cases() -> Iterator[Case]:
    """The operator test models that ``onnx`` generates, with their input data."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        if case.model is None or not case.data_sets:
            continue
        names = [i.name for i in case.model.graph.input
                 if i.name not in {t.name for t in case.model.graph.initializer}]
        feeds = [dict(zip(names, inputs, strict=False)) for inputs, _ in case.data_sets]
        yield Case(case.name, case.model, feeds)


def data_dir_cases() -> Iterator[Case]:
    """Model folders under ``onnx/backend/test/data`` that ship a model and data."""
    import onnx.backend.test as backend_test

    root = os.path.join(os.path.dirname(backend_test.__file__), "data")
    for model_path in sorted(glob.glob(os.path.join(root, "*", "*", "model.onnx"))):
        folder = os.path.dirname(model_path)
        proto = onnx.load(model_path)
        init = {t.name for t in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in init]
        feeds = []
        for data_set in sorted(glob.glob(os.path.join(folder, "test_data_set_*"))):
            arrays = []
            for i in range(len(names)):
                tensor = onnx.TensorProto()
                with open(os.path.join(data_set, f"input_{i}.pb"), "rb") as fh:
                    tensor.ParseFromString(fh.read())
                arrays.append(onnx.numpy_helper.to_array(tensor))
            feeds.append(dict(zip(names, arrays, strict=True)))
        if feeds:
            yield Case(os.path.relpath(folder, root), proto, feeds)
    for model_path in sorted(glob.glob(os.path.join(root, "light", "*.onnx"))):
        proto = onnx.load(model_path)
        model = load(proto)
        try:
            source = random_source(input_specs(model), 1, seed=0)
            feeds = [f for f, _ in source.chunks()]
        except UserError:
            continue
        yield Case("light/" + os.path.basename(model_path), proto, feeds)


def _run_original(case: Case) -> list[list[np.ndarray]] | None:
    try:
        session = make_session(case.model)
        return [[as_comparable(o) for o in session.run(None, feed)] for feed in case.feeds]
    except Exception:  # onnxruntime does not support every operator test case
        return None


def check_case(case: Case, pass_name: str, reference: list[list[np.ndarray]]) -> Outcome:
    """Run one pass on one case through the pass manager and classify the result."""
    cls = get_pass(pass_name)
    try:
        model = load(case.model)
        validation = from_iterable(case.feeds, case.name)
        calib = validation if (cls.needs_data or pass_name in _CALIBRATED) else None
        manager = PassManager([cls()], validation=validation, calib=calib)
        result, report = manager.run(model)
    except UserError as exc:
        return Outcome(case.name, pass_name, "declined", f"user-level refusal: {exc}")
    except Exception as exc:  # the manager itself must never crash
        return Outcome(case.name, pass_name, "crashed", f"{type(exc).__name__}: {exc}")
    record = report.records[0]
    if record.status == Status.CRASHED:
        return Outcome(case.name, pass_name, "crashed", record.message)
    if record.status in (Status.ROLLED_BACK, Status.GATE_FAILED):
        return Outcome(case.name, pass_name, "rolled back", record.message)
    if record.status == Status.UNCHANGED:
        verdict = "declined" if record.refusals else "unchanged"
        detail = record.refusals[0].reason if record.refusals else ""
        return Outcome(case.name, pass_name, verdict, detail)
    proto = to_proto(result)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # the checker raises several types
        return Outcome(case.name, pass_name, "invalid", str(exc).splitlines()[0])
    if not record.exact:
        return Outcome(case.name, pass_name, "kept", "lossy, measured")
    try:
        session = make_session(proto)
        actual = [[as_comparable(o) for o in session.run(None, feed)] for feed in case.feeds]
    except Exception as exc:  # the manager ran it, so this would be a real inconsistency
        return Outcome(case.name, pass_name, "invalid", f"onnxruntime: {exc}")
    names = [o.name for o in proto.graph.output]
    for ref, act in zip(reference, actual, strict=True):
        tol = scaled_tolerance(cls.tolerance, ref)
        cmp = compare_outputs(ref, act, names, tol)
        if not cmp:
            return Outcome(case.name, pass_name, "silent", cmp.summary())
    return Outcome(case.name, pass_name, "kept")


def run_corpus(cases: Sequence[Case], passes: Sequence[str], *, show_progress: bool = False,
               ) -> tuple[list[Outcome], int]:
    """Check every pass on every case onnxruntime can run; returns outcomes, skipped count."""
    outcomes: list[Outcome] = []
    skipped = 0
    for case in progress(cases, enabled=show_progress, desc="selfcheck", unit="model"):
        reference = _run_original(case)
        if reference is None:
            skipped += 1
            continue
        for name in passes:
            outcomes.append(check_case(case, name, reference))
    return outcomes, skipped


FAILURES = ("crashed", "invalid", "silent")


def summarize(outcomes: Sequence[Outcome], skipped: int) -> str:
    """A table of verdicts per pass, then the failing cases."""
    verdicts = ["kept", "unchanged", "declined", "rolled back", *FAILURES]
    by_pass: dict[str, Counter] = {}
    for o in outcomes:
        by_pass.setdefault(o.pass_name, Counter())[o.verdict] += 1
    models = len({o.case for o in outcomes})
    lines = [f"models tried: {models} (skipped {skipped} that onnxruntime cannot run)",
             f"{'pass':<14}" + "".join(f"{v:>13}" for v in verdicts)]
    for name, counts in by_pass.items():
        lines.append(f"{name:<14}" + "".join(f"{counts[v]:>13}" for v in verdicts))
    totals = Counter(o.verdict for o in outcomes)
    lines.append(f"changed {totals['kept']}, declined {totals['declined']}, rolled back "
                 f"{totals['rolled back']}, failed {sum(totals[v] for v in FAILURES)} "
                 f"(crashed {totals['crashed']}, invalid {totals['invalid']}, "
                 f"silent {totals['silent']})")
    for o in outcomes:
        if o.verdict in (*FAILURES, "rolled back"):
            lines.append(f"  {o.verdict}: {o.pass_name} on {o.case}: {o.detail[:200]}")
    return "\n".join(lines)


def collect(sample: int = 1, offset: int = 0) -> list[Case]:
    """The corpus, every ``sample``-th case starting at ``offset``."""
    cases = [*node_cases(), *data_dir_cases()]
    return cases[offset::sample]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m onnxopt.selfcheck``; exit 1 on any failure."""
    parser = argparse.ArgumentParser(prog="python -m onnxopt.selfcheck",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=1, help="check every K-th model")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--passes", help="comma-separated pass names (default: all exact "
                        "passes and quantize)")
    parser.add_argument("--json", help="write every outcome to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("onnxopt").setLevel(logging.CRITICAL)
    passes = args.passes.split(",") if args.passes else default_passes()
    cases = collect(args.sample, args.offset)
    outcomes, skipped = run_corpus(cases, passes, show_progress=True)
    print(summarize(outcomes, skipped))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([vars(o) for o in outcomes], fh, indent=1)
    return 1 if any(o.verdict in FAILURES for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
