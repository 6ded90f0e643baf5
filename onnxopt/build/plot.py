"""The sweep's picture with matplotlib (an optional extra): quality against latency and MACs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_sweep(result: Any, path: Path) -> tuple[Path | None, str | None]:
    """Write ``path`` (PNG); without matplotlib write nothing and say so in one line.

    Returns:
        (the file written or None, a note for the user or None).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, ("no plot: matplotlib is not installed (pip install 'onnxopt[plot]'); "
                      "the table and sweep.html have the same figures")
    batch = result.primary_batch
    rows = [result.rows[0], *result.candidates()]
    quality = "top-1 accuracy" if result.labelled else "top-1 agreement with the original"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    original = result.rows[0]
    for ax, name in zip(axes, ("latency", "macs"), strict=True):
        for r in rows:
            y = r.quality(result.labelled)
            x = r.latency[batch].ratio if name == "latency" else \
                (r.macs / original.macs if r.macs and original.macs else None)
            if y is None or x is None:
                continue
            ax.scatter([x], [y], s=60 if r.pareto else 25,
                       color="tab:orange" if r.pareto else "tab:blue", zorder=3)
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        front = sorted((r for r in rows if r.pareto), key=lambda r: r.latency[batch].ratio)
        if name == "latency" and len(front) > 1:
            ax.plot([r.latency[batch].ratio for r in front],
                    [r.quality(result.labelled) for r in front], color="tab:orange", lw=1)
        ax.set_xlabel(f"latency at batch {batch}, x the original" if name == "latency"
                      else "MACs, x the original")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(quality)
    fig.suptitle(f"{Path(result.model).name}: variants (orange: Pareto front)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path, None
