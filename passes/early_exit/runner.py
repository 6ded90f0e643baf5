"""Run an early-exit bundle with onnxruntime, in batches, stopping each sample at a confident exit.

A batch runs stage 0, then exit head 0; the samples whose margin reaches the exit's threshold
take the head's logits as their answer and leave the batch, and only the rest run stage 1, and
so on; the samples no exit takes get the last stage's outputs (the full model's). Answers come
back in input order. At load time each stage is merged with its exit head (``onnx.compose``)
so that an exit costs one onnxruntime call.

The single-file form (the ``early-exit`` pass) needs no runner: it is one ONNX model whose
later stages sit inside ``If`` branches, so a plain onnxruntime session exits early.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.compose
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.data import FeedSource, input_specs
from onnxopt.errors import DataError
from onnxopt.passes.early_exit.bundle import read_manifest
from onnxopt.passes.early_exit.exits import ExitPlan, StagedReport, staged_report
from onnxopt.report import plural
from onnxopt.session import make_session, stream

logger = logging.getLogger(__name__)


@dataclass
class EarlyExitResult:
    """Outputs of a bundle run and where each sample exited.

    Attributes:
        outputs: The model outputs, as the original model would name and shape them.
        exits: Per sample, the index of the exit that answered; ``num_exits`` means the
            sample ran the whole model.
    """

    outputs: list[np.ndarray]
    exits: np.ndarray


class EarlyExitModel:
    """Runner for a bundle written by :func:`onnxopt.passes.early_exit.bundle.write_bundle`.

    Args:
        path: The bundle folder.
        threads: Intra-op threads per onnxruntime session (0 lets onnxruntime choose).

    Raises:
        UserError: The folder is not a readable bundle.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.input_names: list[str] = list(self.manifest["inputs"])
        self.output_names: list[str] = list(self.manifest["outputs"])
        stages = self.manifest["stages"]
        exits = self.manifest["exits"]
        self._stage_inputs = [list(s["inputs"]) for s in stages]
        # Stage k and head k run as one session: one onnxruntime call per exit, not two.
        self._stages: list[ort.InferenceSession] = [
            make_session(_stage_with_head(self.path, stages[k], exits[k])
                         if k < len(exits) else self.path / stages[k]["file"], threads=threads)
            for k in range(len(stages))]
        self.thresholds: list[float] = [float(e["threshold"]) for e in exits]
        self.exit_macs: list[int] = [int(e["macs"]) for e in exits]
        logger.info("loaded bundle %s: %d stages, %s", self.path, len(self._stages),
                    plural(len(exits), "exit"))

    @property
    def num_exits(self) -> int:
        """Number of exit heads (the full path is exit index ``num_exits``)."""
        return len(self.thresholds)

    def run_one(self, feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Run one sample (batch 1); returns the outputs and the exit that answered."""
        current = {name: feeds[name] for name in self._stage_inputs[0]}
        outputs: list[np.ndarray] = []
        for k, stage in enumerate(self._stages):
            outputs = stage.run(None, current)
            if k < len(self.thresholds) and outputs[2].reshape(-1)[0] >= self.thresholds[k]:
                return [outputs[1]], k
            if k + 1 < len(self._stages):
                current = {self._stage_inputs[k + 1][0]: outputs[0]}
        return outputs, len(self.thresholds)

    def run(self, feeds: Mapping[str, np.ndarray]) -> EarlyExitResult:
        """Run a batch; confident samples leave it at each exit, the rest go on.

        Outputs are in input order, concatenated along the batch axis.
        """
        n = int(np.shape(feeds[self.input_names[0]])[0])
        exits = np.full(n, self.num_exits, dtype=np.int64)
        if not self.num_exits:
            return EarlyExitResult(self.run_stages(feeds), exits)
        current = {name: feeds[name] for name in self._stage_inputs[0]}
        rows = np.arange(n)
        answer: np.ndarray | None = None
        for k, stage in enumerate(self._stages):
            outputs = stage.run(None, current)
            if k == self.num_exits:
                assert answer is not None
                answer[rows] = outputs[0]
                break
            if answer is None:
                answer = np.empty((n, *outputs[1].shape[1:]), dtype=outputs[1].dtype)
            take = outputs[2].reshape(-1) >= self.thresholds[k]
            answer[rows[take]] = outputs[1][take]
            exits[rows[take]] = k
            rows = rows[~take]
            if not rows.size:
                break
            current = {self._stage_inputs[k + 1][0]: outputs[0][~take]}
        return EarlyExitResult([answer if answer is not None else np.empty((0,))], exits)

    __call__ = run

    def run_stages(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the whole batch through every stage, ignoring the exits (the full model)."""
        current = {name: feeds[name] for name in self._stage_inputs[0]}
        outputs: list[np.ndarray] = []
        for k, stage in enumerate(self._stages):
            outputs = stage.run(None, current)
            if k + 1 < len(self._stages):
                current = {self._stage_inputs[k + 1][0]: outputs[0]}
        return outputs


def _stage_with_head(folder: Path, stage: Mapping[str, Any], exit_: Mapping[str, Any],
                     ) -> onnx.ModelProto:
    """Stage model and exit head merged: outputs (cut tensor, head logits, confidence)."""
    head = onnx.load(folder / exit_["head"])
    prefix = "__exit__/"
    outputs = [stage["outputs"][0], *(prefix + o.name for o in head.graph.output)]
    return onnx.compose.merge_models(onnx.load(folder / stage["file"]), head,
                                     io_map=[(stage["outputs"][0], exit_["cut"])],
                                     outputs=outputs, prefix2=prefix)


def evaluate_bundle(runner: EarlyExitModel, model: ir.Model, plan: ExitPlan, source: FeedSource,
                    *, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                    batch_size: int = 64, limit: int | None = None) -> StagedReport:
    """Run the bundle and the full model on ``source`` and report per exit.

    Args:
        runner: The loaded bundle.
        model: The full model it was made from (the reference).
        plan: The plan the bundle was written from (exit names, thresholds, MACs).
        source: Evaluation data; labels, if present, give accuracy.
        input_shapes: Concrete shapes for dynamic inputs.
        batch_size: Samples per onnxruntime call of the full model.
        limit: Cap on samples.
    """
    exits, staged, full, labels = [], [], [], []
    for feeds, batch_labels, ((ref, *_),) in stream([make_session(model)], source,
                                                    input_specs(model, input_shapes),
                                                    batch_size=batch_size, limit=limit):
        result = runner.run(feeds)
        full.append(ref.argmax(axis=1))
        staged.append(result.outputs[0].argmax(axis=1))
        exits.append(result.exits)
        labels.append(batch_labels)
    if not full:
        raise DataError(f"{source.description}: no samples")
    has_labels = all(lab is not None for lab in labels)
    return staged_report(plan, np.concatenate(exits), np.concatenate(staged),
                         np.concatenate(full),
                         np.concatenate(labels).reshape(-1) if has_labels else None,
                         f"{source.description} (bundle run)")
