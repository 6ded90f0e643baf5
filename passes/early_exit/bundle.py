"""Early-exit bundles on disk: a folder with ``manifest.json`` and the stage and head models.

Layout::

    BUNDLE/
      manifest.json   format, inputs, outputs, stages, exits (cut, head file, threshold, MACs)
      stage0.onnx     model inputs -> cut 1
      head0.onnx      cut 1 -> (logits [N, K], margin [N, 1])
      stage1.onnx     cut 1 -> cut 2
      ...
      stageK.onnx     cut K -> model outputs

An exit head is pooling (GlobalAveragePool, or a 2x2 AveragePool) -> Flatten -> Gemm (the
logits) -> TopK(2) -> MatMul with ``[1, -1]`` (the margin of the top two logits, which the
exit's threshold applies to). :func:`head_nodes` builds it as onnx_ir nodes, so the same head
serves the standalone head models here and the single-file form of the ``early-exit`` pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UserError
from onnxopt.ir import opset_version
from onnxopt.model_io import check_writable, current_umask, write_text
from onnxopt.passes.early_exit.cuts import split_model
from onnxopt.passes.early_exit.exits import ExitHead, ExitPlan, StagedReport
from onnxopt.report import plural

logger = logging.getLogger(__name__)

FORMAT = "onnxopt-early-exit"
VERSION = 2
MANIFEST = "manifest.json"


@dataclass
class HeadNodes:
    """An exit head as loose onnx_ir nodes, ready to be added to a graph.

    Attributes:
        nodes: The nodes, in execution order.
        initializers: Weight values the caller must register in the graph (or a parent).
        logits: The head's class scores ``[N, K]``.
        confidence: The margin of the top two logits per sample ``[N, 1]``.
    """

    nodes: list[ir.Node]
    initializers: list[ir.Value]
    logits: ir.Value
    confidence: ir.Value


def _const(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    return ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                    const_value=tensor)


def reduce_node(op: str, x: ir.Value, axes: Sequence[int] | None, keepdims: int, opset: int,
                initializers: list[ir.Value], name: str) -> ir.Node:
    """A ReduceMax/ReduceMin node for ``opset`` (axes moved from attribute to input in 18)."""
    if axes is None:
        return ir.node(op, [x], {"keepdims": keepdims}, name=name)
    if opset >= 18:
        axes_value = _const(f"{name}_axes", np.asarray(axes, dtype=np.int64))
        initializers.append(axes_value)
        return ir.node(op, [x, axes_value], {"keepdims": keepdims}, name=name)
    return ir.node(op, [x], {"axes": list(axes), "keepdims": keepdims}, name=name)


def head_nodes(x: ir.Value, head: ExitHead, opset: int, prefix: str) -> HeadNodes:
    """Build the exit head reading ``x``; every new name starts with ``prefix``."""
    initializers = [_const(f"{prefix}_weight", head.weight), _const(f"{prefix}_bias", head.bias)]
    nodes: list[ir.Node] = []
    features = x
    if head.pooling == "grid":
        size = list(head.window)
        nodes.append(ir.node("AveragePool", [x], {"kernel_shape": size, "strides": size},
                             name=f"{prefix}_pool"))
    elif head.rank > 2:
        nodes.append(ir.node("GlobalAveragePool", [x], name=f"{prefix}_pool"))
    if nodes:
        nodes.append(ir.node("Flatten", [nodes[-1].outputs[0]], {"axis": 1},
                             name=f"{prefix}_flatten"))
        features = nodes[-1].outputs[0]
    gemm = ir.node("Gemm", [features, *initializers], {"transB": 1}, name=f"{prefix}_gemm")
    if opset >= 10:
        k = _const(f"{prefix}_k", np.asarray([2], dtype=np.int64))
        initializers.append(k)
        top = ir.node("TopK", [gemm.outputs[0], k], {"axis": 1}, num_outputs=2,
                      name=f"{prefix}_top2")
    else:
        top = ir.node("TopK", [gemm.outputs[0]], {"axis": 1, "k": 2}, num_outputs=2,
                      name=f"{prefix}_top2")
    sign = _const(f"{prefix}_sign", np.asarray([[1.0], [-1.0]], dtype=np.float32))
    initializers.append(sign)
    diff = ir.node("MatMul", [top.outputs[0], sign], name=f"{prefix}_margin")
    nodes += [gemm, top, diff]
    for node in nodes:
        node.outputs[0].name = node.name
    top.outputs[1].name = f"{prefix}_top2_index"
    classes = int(head.weight.shape[0])
    batch = x.shape[0] if x.shape is not None and len(x.shape) else "N"
    logits, confidence = gemm.outputs[0], diff.outputs[0]
    logits.name = f"{prefix}_logits"
    logits.type = confidence.type = ir.TensorType(ir.DataType.FLOAT)
    logits.shape = ir.Shape([batch, classes])
    confidence.shape = ir.Shape([batch, 1])
    return HeadNodes(nodes, initializers, logits, confidence)


def head_model(head: ExitHead, cut: ir.Value, opset: int, ir_version: int) -> ir.Model:
    """A standalone model ``cut tensor -> (logits, confidence)``."""
    x = ir.Value(name=cut.name, shape=cut.shape, type=cut.type)
    parts = head_nodes(x, head, opset, "head")
    graph = ir.Graph([x], [parts.logits, parts.confidence], nodes=parts.nodes,
                     initializers=parts.initializers, opset_imports={"": opset},
                     name=f"exit_head_{cut.name}")
    return ir.Model(graph, ir_version=ir_version, producer_name="onnxopt")


def write_bundle(path: str | os.PathLike, model: ir.Model, plan: ExitPlan | None = None, *,
                 cuts: Sequence[str] = (), eval_report: StagedReport | None = None) -> Path:
    """Write the stages (and, with a plan, the exit heads) of ``model`` to a bundle folder.

    The folder is assembled next to ``path`` and renamed into place, so a failure leaves no
    half-written bundle. An existing folder is replaced only if it is empty or a bundle.

    Args:
        path: The bundle folder.
        model: The full model, with shapes inferred.
        plan: Exit heads and thresholds; without one the bundle is a plain split at ``cuts``.
        cuts: Cut tensor names, used only when there is no plan.
        eval_report: Outcome on evaluation data, stored in the manifest.

    Raises:
        UserError: The folder cannot be written or holds something other than a bundle.
    """
    dest = Path(path)
    check_destination(dest)
    cut_names = plan.cuts if plan is not None else list(cuts)
    stages = split_model(model, cut_names)
    opset = opset_version(model)
    values = {v.name: v for n in model.graph for v in n.outputs}
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "inputs": [v.name for v in stages[0].graph.inputs],
        "outputs": [v.name for v in model.graph.outputs],
        "stages": [], "exits": [],
        "total_macs": None if plan is None else plan.total_macs,
        "target": None if plan is None else plan.target,
        "dropped_exits": {} if plan is None else dict(plan.dropped),
        "guarantee": None if plan is None or plan.guarantee is None
        else plan.guarantee.to_dict(),
        "calibration": None if plan is None or plan.calib_report is None
        else plan.calib_report.to_dict(),
        "evaluation": None if eval_report is None else eval_report.to_dict(),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise UserError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from None
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; mkdir would not
        for k, stage in enumerate(stages):
            ir.save(stage, tmp / f"stage{k}.onnx")
            manifest["stages"].append({
                "file": f"stage{k}.onnx", "inputs": [v.name for v in stage.graph.inputs],
                "outputs": [v.name for v in stage.graph.outputs]})
        if plan is not None:
            macs = plan.exit_macs()
            for k, head in enumerate(plan.heads):
                ir.save(head_model(head, values[head.cut], opset, model.ir_version),
                        tmp / f"head{k}.onnx")
                manifest["exits"].append({
                    "after_stage": k, "cut": head.cut, "head": f"head{k}.onnx",
                    "threshold": head.threshold, "temperature": head.temperature,
                    "pooling": head.pooling, "macs": macs[k],
                    "macs_before": head.macs_before, "head_macs": head.macs})
            manifest["full_macs"] = macs[-1]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
        _replace_dir(tmp, dest)
    except OSError as exc:
        raise UserError(f"cannot write bundle {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote bundle %s: %d stages, %s", dest, len(stages),
                plural(len(manifest["exits"]), "exit"))
    return dest


def check_destination(dest: Path) -> None:
    """Fail early when ``dest`` cannot become a bundle folder (see :func:`write_bundle`)."""
    check_writable(dest, folder_ok=True)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"bundle path exists and is not a folder: {dest}")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise UserError(f"bundle folder {dest} is not empty and holds no {MANIFEST}; "
                        f"refusing to replace it")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``, replacing an old bundle only after the new one is in place."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a bundle folder.

    Raises:
        UserError: The folder or its manifest is missing or not an early-exit bundle.
    """
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise UserError(f"not an early-exit bundle (no {MANIFEST}): {folder}")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable manifest {file}: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{file} is not a version-{VERSION} {FORMAT} manifest")
    return manifest


def update_manifest(path: str | os.PathLike, **fields: Any) -> None:
    """Set top-level manifest ``fields`` of an existing bundle (atomic file replace)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    manifest.update(fields)
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False))
