"""The results picture: accuracy (or output SQNR) against MACs, onnxopt against the peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_OURS, _PEER, _ORIGINAL = "tab:blue", "tab:red", "black"
#: Line styles of the pruning groups; distinct dashes keep coinciding criteria visible.
_GROUP_STYLES = [("tab:green", "-", "o"), ("tab:purple", "--", "v"), ("tab:orange", ":", "^"),
                 ("tab:cyan", "-.", "D"), ("tab:olive", "-", "P"), ("tab:brown", "--", "X")]


#: SQNR shown for identical outputs (and the top of the SQNR axis).
SQNR_CAP_DB = 100.0


def _y(row: dict[str, Any], labelled: bool) -> float | None:
    """Top-1 accuracy in % with labels; else the SQNR against the original, capped."""
    if labelled:
        return None if row.get("accuracy") is None else 100 * row["accuracy"]
    if "agreement" not in row:
        return None
    sqnr = row.get("sqnr_db")
    return SQNR_CAP_DB if sqnr is None else min(sqnr, SQNR_CAP_DB)


def _x(row: dict[str, Any]) -> float | None:
    """MACs per sample in millions; the expected MACs for data-dependent (control-flow) models."""
    if "macs" not in row:
        return None
    if row.get("main_graph_only"):
        return None if not row.get("expected_macs") else row["expected_macs"] / 1e6
    return row["macs"] / 1e6


def _clusters(points: list[tuple[float, float, str]], xspan: float,
              yspan: float) -> list[tuple[float, float, list[str]]]:
    """Points closer than a few % of the axes, merged so their labels do not overprint."""
    merged: list[tuple[float, float, list[str]]] = []
    for x, y, label in sorted(points):
        for i, (cx, cy, labels) in enumerate(merged):
            if abs(x - cx) <= 0.05 * xspan and abs(y - cy) <= 0.04 * yspan:
                merged[i] = (cx, cy, [*labels, label])
                break
        else:
            merged.append((x, y, [label]))
    return merged


def _wrap(labels: list[str], per_line: int = 3) -> str:
    return "\n".join(", ".join(labels[i:i + per_line]) for i in range(0, len(labels), per_line))


def _panel(ax: Any, model: dict[str, Any]) -> None:
    labelled = model["labelled"]
    measured = [r for r in model["rows"] if _x(r) is not None and _y(r, labelled) is not None]
    if not measured:
        ax.text(0.5, 0.5, "no measured rows", ha="center", transform=ax.transAxes)
        return
    xs = [_x(r) for r in measured]
    ys = [_y(r, labelled) for r in measured]
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    ours: list[tuple[float, float, str]] = []
    theirs: list[tuple[float, float, str]] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for row, x, y in zip(measured, xs, ys, strict=True):
        if row["kind"] == "original":
            ax.scatter(x, y, marker="*", s=220, color=_ORIGINAL, zorder=5, label="original")
        elif row["kind"] == "peer":
            ax.scatter(x, y, marker="s", s=60, color=_PEER, zorder=4)
            theirs.append((x, y, row["label"].replace("ort QDQ ", "ORT ")
                           .replace(" (default)", "")))
        elif row.get("group"):
            groups.setdefault(row["group"], []).append(row)
        else:
            ax.scatter(x, y, marker="o", s=40, color=_OURS, zorder=4)
            ours.append((x, y, row["label"]))
    for x, y, labels in _clusters(ours, xspan, yspan):
        ax.annotate(_wrap(labels), (x, y), textcoords="offset points", xytext=(-6, 6),
                    ha="right", fontsize=7, color=_OURS)
    for x, y, labels in _clusters(theirs, xspan, yspan):
        ax.annotate(_wrap(labels, 2), (x, y), textcoords="offset points", xytext=(-6, -12),
                    ha="right", va="top", fontsize=7, color=_PEER)
    for i, (group, members) in enumerate(sorted(groups.items())):
        members.sort(key=lambda r: r["macs"])
        color, dashes, marker = _GROUP_STYLES[i % len(_GROUP_STYLES)]
        ax.plot([_x(r) for r in members], [_y(r, labelled) for r in members], color=color,
                linestyle=dashes, marker=marker, markersize=5, alpha=0.85,
                label=f"onnxopt {group}")
    ax.scatter([], [], marker="o", color=_OURS, label="onnxopt pipeline")
    ax.scatter([], [], marker="s", color=_PEER, label="peer tool")
    ax.set_title(model["name"], fontsize=10)
    ax.set_xlabel("MACs per sample (millions)")
    ax.set_ylabel("top-1 accuracy (%)" if labelled else
                  f"output SQNR vs original (dB, identical = {SQNR_CAP_DB:g})")
    ax.margins(x=0.25, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def accuracy_vs_macs(results: dict[str, Any], path: Path) -> Path:
    """One panel per model: top-1 accuracy (labelled data) or output SQNR against the
    original (random-weight models, whose top-1 is nearly constant) against MACs per sample.

    Pruning rows of one group (a criterion across budgets) are joined by a line; other
    onnxopt pipelines are circles, peers red squares, the original a black star.
    """
    models = results["models"]
    cols = min(2, max(1, len(models)))
    rows = (len(models) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models, strict=False):
        _panel(ax, model)
    machine = results["machine"]
    fig.suptitle(f"onnxopt vs peers — {machine['date']}, {machine['cpu']}, onnxruntime "
                 f"{machine['onnxruntime']}" + (" (quick)" if results["config"]["quick"] else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
