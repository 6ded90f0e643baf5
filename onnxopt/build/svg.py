"""Small inline SVG charts (bars and scatter plots) for the HTML report, with no dependency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

FONT = 'font-family="sans-serif" font-size="11"'
BLUE, ORANGE, GREY = "#3b6fb6", "#e07b24", "#999"


@dataclass(frozen=True)
class Bar:
    """One bar: ``value`` of ``maximum`` (``maximum`` None scales to the largest value)."""

    label: str
    value: float
    text: str
    maximum: float | None = None


def bar_chart(title: str, bars: Sequence[Bar], *, width: int = 560) -> str:
    """Horizontal bars, one row per item, with the value's text at the end of the bar."""
    row, left, right = 16, 170, 70
    height = 24 + row * len(bars) + 6
    scale = max((b.maximum or b.value for b in bars), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="4" y="14" {FONT} font-weight="bold">{escape(title)}</text>']
    span = width - left - right
    for i, bar in enumerate(bars):
        y = 22 + i * row
        full = span * (bar.maximum if bar.maximum is not None else scale) / scale
        filled = span * max(bar.value, 0.0) / scale
        label = bar.label if len(bar.label) <= 28 else bar.label[:27] + "…"
        parts.append(f'<text x="{left - 6}" y="{y + 11}" {FONT} text-anchor="end">'
                     f'<title>{escape(bar.label)}</title>{escape(label)}</text>')
        if bar.maximum is not None:
            parts.append(f'<rect x="{left}" y="{y + 2}" width="{full:.1f}" height="{row - 4}" '
                         f'fill="#e4e9f2"/>')
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{filled:.1f}" height="{row - 4}" '
                     f'fill="{BLUE}"/>')
        parts.append(f'<text x="{left + max(full, filled) + 4:.1f}" y="{y + 11}" {FONT}>'
                     f'{escape(bar.text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Point:
    """One point of a scatter plot; ``marked`` points are drawn large and joined by a line."""

    x: float
    y: float
    label: str
    marked: bool = False


def scatter(title: str, points: Sequence[Point], x_label: str, y_label: str, *,
            width: int = 420, height: int = 300) -> str:
    """A scatter plot with labelled points; the marked ones (a Pareto front) are joined."""
    left, bottom, top, right = 56, 40, 24, 16
    xs, ys = [p.x for p in points], [p.y for p in points]
    x0, x1 = _padded(min(xs, default=0.0), max(xs, default=1.0))
    y0, y1 = _padded(min(ys, default=0.0), max(ys, default=1.0))
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + pw * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return top + ph * (1 - (y - y0) / (y1 - y0))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="4" y="14" {FONT} font-weight="bold">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
             f'stroke="{GREY}"/>']
    for frac in (0.0, 0.5, 1.0):
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        parts.append(f'<text x="{sx(xv):.1f}" y="{top + ph + 14}" {FONT} '
                     f'text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" {FONT} '
                     f'text-anchor="end">{yv:.4g}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" {FONT} '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2:.1f}" {FONT} text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{escape(y_label)}</text>')
    front = sorted((p for p in points if p.marked), key=lambda p: p.x)
    if len(front) > 1:
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{ORANGE}"/>')
    for p in points:
        color, r = (ORANGE, 5) if p.marked else (BLUE, 3.5)
        parts.append(f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="{r}" fill="{color}">'
                     f'<title>{escape(p.label)}</title></circle>')
        parts.append(f'<text x="{sx(p.x) + 6:.1f}" y="{sy(p.y) - 6:.1f}" {FONT}>'
                     f'{escape(p.label[:24])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _padded(low: float, high: float) -> tuple[float, float]:
    span = high - low or abs(high) or 1.0
    return low - 0.08 * span, high + 0.08 * span
