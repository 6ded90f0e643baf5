"""prune's plan and its report: the summary line, per-group rows, calibration effect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxopt.channels import ChannelGroup
from onnxopt.channels.tie import Role
from onnxopt.cost import ModelCost
from onnxopt.ir import node_label
from onnxopt.pass_base import PassContext
from onnxopt.report import plural

if TYPE_CHECKING:
    from onnxopt.passes.prune.latency_plan import LatencyOutcome
    from onnxopt.passes.prune.prune import PruneOptions


@dataclass
class Plan:
    """Which channels each candidate group keeps, and why."""

    criterion: str
    refit: bool
    kind: str
    value: float
    allocation: str
    groups: list[ChannelGroup]
    keep: dict[int, np.ndarray]
    rows: list[dict[str, Any]]
    savings: dict[str, dict[int, float]]
    latency: list[LatencyOutcome] | None = None
    """What the latency budget predicted and measured, per batch size named."""


def summary_line(plan: Plan, opts: PruneOptions, before: ModelCost, no_groups: str) -> str:
    """The one-line summary of a plan: budget, criterion, channels, MACs, params, latency."""
    kept = sum(r["kept"] for r in plan.rows)
    total = sum(r["total"] for r in plan.rows)
    params = before.params - sum(plan.savings["params"].values())
    how = "" if plan.kind == "ratio" else f", {plan.allocation}"
    if before.macs is None:
        macs = "MACs unknown"  # why: stats["macs_unknown"]
    else:
        kept_macs = before.macs - sum(plan.savings.get("macs", {}).values())
        macs = f"MACs {100 * kept_macs / max(before.macs, 1):.1f}%"
    text = (f"{plan.kind}={plan.value:g} by {plan.criterion}{how}: "
            f"{plural(len(plan.rows), 'group')}, "
            f"channels {total} -> {kept}, {macs}, "
            f"params {100 * params / max(before.params, 1):.1f}%")
    if plan.latency:
        parts = []
        for t in plan.latency:  # one per batch size named
            corrected = (f", corrected from {t.first_measured:.2f}x"
                         if t.corrected else "")
            parts.append(f"{t.measured:.2f}x measured ({t.predicted:.2f}x predicted, "
                         f"A/A {t.aa:.2f}x{corrected}) of {t.original_ms:.3g} ms at batch "
                         f"{t.batch}")
        text += (f", latency {', '.join(parts)}, "
                 f"{plural(plan.latency[0].threads, 'thread')}")
    if not plan.rows:
        text += f" ({no_groups})"
    return text


def calib_effect(original: ir.Model, unrefit: ir.Model, model: ir.Model, ctx: PassContext,
                  opts: PruneOptions, stats: dict[str, Any]) -> str:
    """Top-1 agreement (and accuracy) on calibration data before and after the refit."""
    from onnxopt.session import stream_tensors

    output = model.graph.outputs[0]
    if output.shape is not None and (len(output.shape) != 2 or output.shape[1] == 1):
        return ""  # no class scores (checked before running three models over the data)
    name = output.name
    hits = np.zeros(3)
    correct = np.zeros(3)
    seen, labelled = 0, True
    for outs, labels in stream_tensors([original, unrefit, model], [[name]] * 3, ctx.calib,
                                       batch_size=opts.batch_size, limit=opts.max_samples,
                                       input_shapes=ctx.input_shapes):
        logits = [o[name] for o in outs]
        if logits[0].ndim != 2 or logits[0].shape[1] < 2:
            return ""
        top = [x.argmax(1) for x in logits]
        hits += [np.sum(t == top[0]) for t in top]
        if labels is None:
            labelled = False
        else:
            correct += [np.sum(t == np.asarray(labels).reshape(-1)) for t in top]
        seen += len(top[0])
    if not seen:
        return ""
    agree = hits / seen
    stats.update(calib_agreement_before_reconstruction=float(agree[1]),
                 calib_agreement_after_reconstruction=float(agree[2]))
    text = f"; calib agreement {agree[1]:.1%} -> {agree[2]:.1%} by the refit"
    if labelled:
        acc = correct / seen
        stats.update(calib_accuracy_original=float(acc[0]),
                     calib_accuracy_before_reconstruction=float(acc[1]),
                     calib_accuracy_after_reconstruction=float(acc[2]))
        text += f" (accuracy {acc[1]:.1%} -> {acc[2]:.1%})"
    return text


def plan_rows(groups: list[ChannelGroup], keep: dict[int, np.ndarray],
               savings: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """One report row per group: channels kept, MACs, params and time saved."""
    rows = []
    for group in groups:
        producers = [node_label(t.node) for t in group.ties_with_role(Role.PRODUCER)]
        rows.append({
            "group": group.index,
            "tensor": group.members[0].label() if group.members else group.label(),
            "producers": producers,
            "kept": int(keep[group.index].sum()),
            "total": len(keep[group.index]),
            "macs_saved": (int(round(savings["macs"].get(group.index, 0.0)))
                           if "macs" in savings else None),
            "params_saved": int(round(savings["params"].get(group.index, 0.0))),
        })
        if "latency" in savings:
            rows[-1]["time_saved_ms"] = float(savings["latency"].get(group.index, 0.0))
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The per-group plan as a small table (printed by ``--dry-run``)."""
    timed = any("time_saved_ms" in r for r in rows)
    lines = [f"{'group':>5}  {'kept':>9}  {'MACs saved':>12}  {'params saved':>12}  "
             + (f"{'time saved':>11}  " if timed else "") + "producers"]
    for row in rows:
        names = ", ".join(row["producers"][:3]) + (" ..." if len(row["producers"]) > 3 else "")
        macs = "?" if row["macs_saved"] is None else f"{row['macs_saved']:,}"
        time_saved = (f"{1e3 * row.get('time_saved_ms', 0.0):>8.1f} us  " if timed else "")
        lines.append(f"{row['group']:>5}  {row['kept']:>4}/{row['total']:<4}  "
                     f"{macs:>12}  {row['params_saved']:>12,}  {time_saved}{names}")
    return "\n".join(lines)
