"""Per-pass records of a run, rendered as a table for people and JSON for tools."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxopt.compare import Comparison
from onnxopt.pass_base import Refusal


class Status(str, enum.Enum):
    """What became of one pass in a run (the value is what the table and JSON show)."""

    KEPT = "kept"
    UNCHANGED = "unchanged"
    ROLLED_BACK = "rolled back"
    GATE_FAILED = "gate failed"
    CRASHED = "crashed"
    #: ``--dry-run``: a pass without a plan mode that was not run (a lossy one, or any after
    #: a plan: it would run on a model whose plan was not applied).
    NOT_RUN = "not run"

    def __str__(self) -> str:
        return self.value

    @property
    def failed(self) -> bool:
        """Whether the pass's rewrite was not kept for a reason the user must hear about."""
        return self in (Status.ROLLED_BACK, Status.GATE_FAILED, Status.CRASHED)


@dataclass
class Snapshot:
    """Size of the model at one point of the pipeline.

    ``bytes`` is the size of the model as it would be written; for the original model read
    from a file, the size of that file (with its external data), as ``onnxopt info`` shows.
    ``macs`` is per sample, None when a dim it needs is unknown (``macs_unknown`` says why).
    """

    nodes: int
    params: int
    macs: int | None
    bytes: int
    macs_unknown: str = ""


@dataclass
class PassRecord:
    """What happened in one pass."""

    name: str
    exact: bool
    status: Status
    after: Snapshot
    seconds: float
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    vs_previous: Comparison | None = None
    vs_original: Comparison | None = None
    summary: str | None = None
    plan: str | None = None
    promised_agreement: float | None = None
    promise_caveat: str = ""

    @property
    def failed(self) -> bool:
        return self.status.failed


@dataclass
class RunReport:
    """The whole run: the original model, one record per pass, and the final state."""

    original: Snapshot
    records: list[PassRecord] = field(default_factory=list)
    original_accuracy: float | None = None
    validated_samples: int = 0
    validation_source: str = ""
    output_path: str | None = None
    messages: list[str] = field(default_factory=list)
    noise_floor: list[float] | None = None
    quality_floor: str | None = None
    validation_note: str | None = None

    @property
    def final(self) -> Snapshot:
        return self.records[-1].after if self.records else self.original

    @property
    def failures(self) -> list[PassRecord]:
        return [r for r in self.records if r.failed]

    @property
    def final_accuracy(self) -> float | None:
        for record in reversed(self.records):
            if record.status is Status.KEPT and record.vs_original is not None:
                return record.vs_original.accuracy
        return self.original_accuracy

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "original": asdict(self.original),
            "original_accuracy": self.original_accuracy,
            "validated_samples": self.validated_samples,
            "validation_source": self.validation_source,
            "output_path": self.output_path,
            "messages": self.messages,
            "noise_floor": self.noise_floor,
            "quality_floor": self.quality_floor,
            "validation_note": self.validation_note,
            "passes": [_record_dict(r) for r in self.records],
            "final": asdict(self.final),
        }

    def to_json(self) -> str:
        return json.dumps(_clean(self.to_dict()), indent=2, default=_json_default,
                          allow_nan=False)

    def format_table(self) -> str:
        """The per-pass table: each pass against the stage before it, the total row against
        the original (the table says so under it)."""
        headers = ["pass", "status", "nodes", "params", "MACs", "size", "max err", "agree",
                   "acc", "time"]
        rows = [["(original)", "", str(self.original.nodes), _num(self.original.params),
                 _num(self.original.macs), _bytes(self.original.bytes), "", "",
                 _pct(self.original_accuracy), ""]]
        # A pass that kept no rewrite leaves the model as it was: it shows the size above it
        # (the original's is its file size, which differs from a re-serialization).
        size = self.original.bytes
        for r in self.records:
            cmp = r.vs_previous
            if r.status is Status.KEPT:
                size = r.after.bytes
            rows.append([
                r.name + ("" if r.exact else " ~"), str(r.status), str(r.after.nodes),
                _num(r.after.params), _num(r.after.macs), _bytes(size),
                "" if cmp is None else f"{cmp.max_abs_error:.2g}",
                "" if cmp is None or cmp.agreement is None else f"{cmp.agreement:.3f}",
                "" if r.vs_original is None else _pct(r.vs_original.accuracy),
                f"{r.seconds:.2f}s",
            ])
        o, f = self.original, self.final
        last_vs_original = next((r.vs_original for r in reversed(self.records)
                                 if r.vs_original is not None and r.status is Status.KEPT), None)
        rows.append([
            "total", "", _ratio(f.nodes, o.nodes), _ratio(f.params, o.params),
            _ratio(f.macs, o.macs), _ratio(size, o.bytes),
            "" if last_vs_original is None else f"{last_vs_original.max_abs_error:.2g}",
            "" if last_vs_original is None or last_vs_original.agreement is None
            else f"{last_vs_original.agreement:.3f}",
            _pct(self.final_accuracy), f"{sum(r.seconds for r in self.records):.2f}s",
        ])
        widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
        lines = [_line(headers, widths), _line(["-" * w for w in widths], widths)]
        lines += [_line(row, widths) for row in rows[:-1]]
        lines.append(_line(["-" * w for w in widths], widths))
        lines.append(_line(rows[-1], widths))
        notes = []
        for r in self.records:
            if r.message:
                notes.append(f"{r.name}: {r.message}")
            if r.summary and not r.failed:
                notes.append(f"{r.name}: {r.summary}")
            missed = _missed_promise(r, self.validated_samples)
            if missed:
                notes.append(f"{r.name}: {missed}")
            if r.refusals:
                reasons: dict[str, int] = {}
                for ref in r.refusals:
                    reasons[ref.reason] = reasons.get(ref.reason, 0) + 1
                text = "; ".join(f"{k} (x{v})" if v > 1 else k for k, v in reasons.items())
                notes.append(f"{r.name}: refused {len(r.refusals)}: {text}")
        unknown = next((s.macs_unknown for s in [self.original] + [r.after for r in self.records]
                        if s.macs is None and s.macs_unknown), "")
        if unknown:
            notes.append(f"MACs ?: unknown, {unknown}")
        if self.validated_samples:
            notes.append((self.validation_note or
                          f"validated on {plural(self.validated_samples, 'sample')} from "
                          f"{self.validation_source}") + "; '~' marks lossy passes")
            exact = [r.vs_previous for r in self.records if r.exact and r.vs_previous]
            if exact and exact[0].noise_multiple is not None:
                floor = exact[0].noise_floor or 0.0
                notes.append(f"exact passes: checked on the first samples, within their "
                             f"rtol or {exact[0].noise_multiple:g}x onnxruntime's own noise "
                             f"on this model (max abs {floor:.2g}, all graph optimizations "
                             f"against none)")
            if self.quality_floor and any(not r.exact for r in self.records):
                notes.append(f"lossy passes: quality floor {self.quality_floor}")
        if any(r.vs_previous is not None for r in self.records):
            notes.append("max err and agree compare each pass with the stage before it, "
                         "the total with the original")
        return "\n".join(lines + notes + self.messages)


def _missed_promise(record: PassRecord, samples: int | None) -> str:
    """A note when validation measured less agreement than the pass promised, else ''."""
    promised, measured = record.promised_agreement, record.vs_previous
    if (promised is None or record.failed or measured is None or measured.agreement is None
            or measured.agreement >= promised):
        return ""
    on = f" on the {plural(samples, 'validation sample')}" if samples else ""
    return (f"measured agreement {measured.agreement:.3f}{on} is below the promised "
            f"{promised:g}" + (f": {record.promise_caveat}" if record.promise_caveat else ""))


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 sample``, ``2 samples`` (``nouns`` for irregular plurals)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()


def _num(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _ratio(new: int | None, old: int | None) -> str:
    return f"{new / old:.3f}x" if old and new is not None else "-"


def _record_dict(r: PassRecord) -> dict[str, Any]:
    return {
        "name": r.name, "exact": r.exact, "status": r.status.value, "seconds": r.seconds,
        "message": r.message, "summary": r.summary, "plan": r.plan,
        "promised_agreement": r.promised_agreement, "after": asdict(r.after),
        "stats": r.stats,
        "refusals": [asdict(x) for x in r.refusals],
        "vs_previous": _comparison_dict(r.vs_previous),
        "vs_original": _comparison_dict(r.vs_original),
    }


def _comparison_dict(c: Comparison | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "passed": c.passed, "rtol": c.tolerance.rtol, "atol": c.tolerance.atol,
        "noise_floor": c.noise_floor, "noise_multiple": c.noise_multiple,
        "max_abs_error": c.max_abs_error, "needed_rtol": c.needed_rtol, "cosine": c.cosine,
        "sqnr_db": c.sqnr_db, "agreement": c.agreement, "accuracy": c.accuracy,
    }


def _clean(obj: Any) -> Any:
    """Replace non-finite floats (JSON has none) by strings, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return str(obj)
