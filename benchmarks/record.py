"""latest.json: what of each run is kept (the table's numbers and a line per pass), and its layout.

The full ``RunReport`` of every optimizer run is not kept: its refusal lists and pass
statistics made the file half a megabyte. ``onnxopt optimize --report`` gives them for one run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: How far a lossy pass moved the outputs from the model before it.
_LOSSY_METRICS = ("max_abs_error", "needed_rtol", "cosine", "sqnr_db", "agreement", "accuracy")
#: Latency statistics kept: the table's cell, and the rounds behind it.
_LATENCY_KEPT = ("median_ms", "ratio", "ratio_q1", "ratio_q3", "rounds")
#: Significant digits of a stored float (integer part always kept); far below the noise.
_DIGITS = 7


def pass_summaries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One short dict per pass of a ``RunReport`` JSON dict.

    Args:
        report: ``json.loads(RunReport.to_json())``.

    Returns:
        Per pass its name, status, exact flag and seconds; a lossy pass that was validated
        also gets the metrics of its outputs against the model before it.
    """
    summaries = []
    for record in report["passes"]:
        summary = {k: record[k] for k in ("name", "status", "exact", "seconds")}
        if not record["exact"] and record.get("vs_previous"):
            summary.update({k: record["vs_previous"].get(k) for k in _LOSSY_METRICS})
        summaries.append(summary)
    return summaries


def expected_macs(report: dict[str, Any] | None) -> float | None:
    """Data-dependent MACs per sample a pass reported (``expected_macs`` in its stats)."""
    def find(obj: Any) -> float | None:
        if isinstance(obj, dict):
            if isinstance(obj.get("expected_macs"), (int, float)):
                return float(obj["expected_macs"])
            return next((v for v in map(find, obj.values()) if v is not None), None)
        return None
    if not report:
        return None
    return next((v for v in (find(p.get("stats")) for p in reversed(report["passes"])
                             if p["status"] == "kept") if v is not None), None)


def latency_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The kept fields of a ``LatencyStats.to_dict()``."""
    return {k: stats[k] for k in _LATENCY_KEPT}


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` with floats rounded and every flat dict or list on one line."""
    path.write_text(_dumps(_rounded(results), 0) + "\n")


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float) and math.isfinite(obj) and obj != 0.0:
        return round(obj, max(0, _DIGITS - 1 - math.floor(math.log10(abs(obj)))))
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _dumps(obj: Any, level: int) -> str:
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    if not children or not any(isinstance(v, (dict, list)) for v in children):
        return json.dumps(obj, default=str, allow_nan=False)
    pad = " " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    return "[\n" + ",\n".join(pad + _dumps(v, level + 1) for v in obj) + "\n" + " " * level + "]"
