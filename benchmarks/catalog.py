"""What the benchmark runs: the declarative lists of pipelines and models, and which run now."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

import onnxopt


@dataclass(frozen=True)
class PipelineEntry:
    """One row of the benchmark: a pipeline spec run through ``onnxopt.optimize``.

    Attributes:
        label: Row label.
        spec: Pipeline spec; the row runs only when every pass in it is registered.
        needs_calib: Give the calibration data to ``optimize``.
        group: Rows of one group are joined by a line in the plot (budgets of a criterion).
        latency: Measure latency (criterion sweeps only need size and accuracy).
        full_only: Skip in ``--quick``.
        labelled_only: Run only on models with labelled data (accuracy sweeps).
    """

    label: str
    spec: str
    needs_calib: bool = False
    group: str = ""
    latency: bool = True
    full_only: bool = False
    labelled_only: bool = False


_BASE = "cleanup,fold-bn"
#: Every pipeline of the benchmark. Later passes add their rows here.
PIPELINES: list[PipelineEntry] = [
    PipelineEntry("cleanup", "cleanup"),
    PipelineEntry("fold-bn", _BASE),
    PipelineEntry("fuse-resconv", f"{_BASE},fuse-resconv"),
    PipelineEntry("prune-zero", f"{_BASE},prune-zero"),
    PipelineEntry("dead-layers", f"{_BASE},prune-zero,dead-layers"),
    *(PipelineEntry(f"prune -{100 - keep}% MACs", f"{_BASE},prune(macs={keep / 100:g})",
                    needs_calib=True, group="prune (default criterion)", full_only=keep != 50)
      for keep in (70, 50, 30)),
    *(PipelineEntry(f"prune -{100 - keep}% MACs ({crit})",
                    f"{_BASE},prune(macs={keep / 100:g},criterion={crit})",
                    needs_calib=True, group=f"prune {crit}", latency=False, full_only=True,
                    labelled_only=True)
      for crit in ("l1", "l2", "random") for keep in (70, 50, 30)),
    PipelineEntry("quantize", f"{_BASE},quantize", needs_calib=True),
    PipelineEntry("prune -50% + quantize", f"{_BASE},prune(macs=0.5),quantize", needs_calib=True),
    PipelineEntry("early-exit", f"{_BASE},early-exit", needs_calib=True),
]


@dataclass(frozen=True)
class ModelEntry:
    """A benchmark model and the data it is measured on.

    Attributes:
        name: Short name (``--models``).
        description: One line for the report.
        build: ``build(quick)`` returns a ``ModelProto`` or a path; None if unavailable.
        labelled: Path of a labelled eval ``.npz``; None means random inputs, no labels.
        calib: Path of a calibration ``.npz`` (None: random inputs).
        full_only: Skip in ``--quick``.
    """

    name: str
    description: str
    build: Callable[[bool], onnx.ModelProto | Path | None]
    labelled: Path | None = None
    calib: Path | None = None
    full_only: bool = False


def _structure(name: str, full: tuple[int, int],
               quick: tuple[int, int]) -> Callable[[bool], onnx.ModelProto]:
    def build(is_quick: bool) -> onnx.ModelProto:
        from testmodels import STRUCTURES

        width, size = quick if is_quick else full
        return STRUCTURES[name](seed=0, width=width, size=size, batch="N")
    return build


def _resconv_bench(repvgg: bool) -> Callable[[bool], onnx.ModelProto | None]:
    def build(is_quick: bool) -> onnx.ModelProto | None:
        try:
            from testmodels.resconv import resconv_bench_model
        except ImportError:  # the builder arrives with the fuse-resconv work
            return None
        width, size, depth = (16, 16, 4) if is_quick else (64, 32, 8)
        kwargs = {"repvgg": True} if repvgg else {}
        return resconv_bench_model(width=width, size=size, depth=depth, **kwargs)
    return build


def _sizes(name: str, full: tuple[int, int], quick: tuple[int, int]) -> str:
    return f"{name}: random weights, width/size {full[0]}/{full[1]} (quick {quick[0]}/{quick[1]})"


def models() -> list[ModelEntry]:
    """Every benchmark model, in report order."""
    from testmodels import DIGITS_CALIB, DIGITS_EVAL, DIGITS_MODEL

    return [
        ModelEntry("digits", "trained digits ResNet (testmodels/digits_resnet.onnx)",
                   lambda _quick: DIGITS_MODEL, DIGITS_EVAL, DIGITS_CALIB),
        ModelEntry("residual_blocks", _sizes("ResNet basic blocks", (64, 48), (16, 32)),
                   _structure("residual_blocks", (64, 48), (16, 32))),
        ModelEntry("inverted_residual", _sizes("MobileNetV2 blocks", (64, 48), (16, 32)),
                   _structure("inverted_residual", (64, 48), (16, 32))),
        ModelEntry("resconv_bench", "ResConv blocks `Relu(x + a*BN(Conv3x3(x)))`: "
                   "testmodels.resconv.resconv_bench_model, width/size/depth 64/32/8 "
                   "(quick 16/16/4)", _resconv_bench(repvgg=False)),
        ModelEntry("repvgg_bench", "RepVGG blocks (3x3+BN, 1x1+BN, identity BN): "
                   "resconv_bench_model(repvgg=True), width/size/depth 64/32/8",
                   _resconv_bench(repvgg=True), full_only=True),
    ]


def pass_names(spec: str) -> list[str]:
    """Pass names of a spec (options in parentheses dropped)."""
    return [m.group(1) for m in re.finditer(r"([A-Za-z_][\w\-]*)\s*(?:\([^)]*\))?", spec)]


def plan_pipelines(quick: bool) -> tuple[list[PipelineEntry], list[dict[str, str]]]:
    """The entries to run now, and the skipped ones with the reason."""
    registered = onnxopt.registered_passes()
    run, skipped = [], []
    for entry in PIPELINES:
        missing = [n for n in pass_names(entry.spec) if n not in registered]
        if missing:
            reason = f"pass {', '.join(repr(n) for n in missing)} not registered yet"
        elif quick and entry.full_only:
            reason = "full run only"
        else:
            try:
                onnxopt.parse_pipeline(entry.spec)
                reason = ""
            except onnxopt.PipelineError as exc:
                reason = f"spec does not parse: {exc}"
        if reason:
            skipped.append({"label": entry.label, "spec": entry.spec, "reason": reason})
        else:
            run.append(entry)
    return run, skipped
