"""Small server-side SVG charts for the console: no JavaScript, no CDN, no dependencies.

Each function returns one ``<svg>`` element as text, ready to inline in a page
(the caller marks it safe). Every label and title is XML-escaped here, so names
typed by users (KEK names, certificate names) cannot inject markup. Charts are
accessible: ``role="img"`` with a ``<title>`` and ``<desc>``, every bar carries a
text label with its value, and each mark has its own ``<title>`` tooltip. Colours
are presentation attributes, not ``style=``, so a strict Content-Security-Policy
(no inline styles or scripts) does not affect them; they are only the fallback of a chart
seen on its own. In the console every text, axis and mark also carries a class that
``console.css`` colours from the admin's CSS variables, so the charts follow the light
or dark theme (a stylesheet rule wins over a presentation attribute).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape

BAR = "#417690"
BAR_WARN = "#ba2121"
BAR_OK = "#3b7d3b"
AXIS = "#767676"
TEXT = "#333333"
FONT = 'font-family="sans-serif" font-size="11"'
SVG_NS = "http://www.w3.org/2000/svg"


def _mark_class(colour: str) -> str:
    return {BAR_WARN: "kv-chart-mark-warn", BAR_OK: "kv-chart-mark-ok"}.get(colour, "kv-chart-mark")


def _esc(value) -> str:
    return escape(str(value), quote=True)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _open(chart_id: str, title: str, description: str, width: int, height: int) -> list[str]:
    cid = _esc(chart_id)
    return [
        f'<svg xmlns="{SVG_NS}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-labelledby="{cid}-title {cid}-desc" class="kv-chart" id="{cid}">',
        f'<title id="{cid}-title">{_esc(title)}</title>',
        f'<desc id="{cid}-desc">{_esc(description)}</desc>',
    ]


def _empty(parts: list[str], width: int, height: int, message: str) -> str:
    parts.append(f'<text x="{width // 2}" y="{height // 2}" text-anchor="middle" fill="{TEXT}" class="kv-chart-label" {FONT}>'
                 f"{_esc(message)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    *,
    chart_id: str,
    title: str,
    description: str,
    bars: Sequence[tuple[str, int]],
    width: int = 640,
    height: int = 220,
    empty: str = "No data",
) -> str:
    """Vertical bars, one per ``(label, value)``, value written above each bar."""
    parts = _open(chart_id, title, description, width, height)
    if not bars:
        return _empty(parts, width, height, empty)
    left, right, top, bottom = 10, 10, 18, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(max(value for _, value in bars), 1)
    slot = plot_w / len(bars)
    bar_w = max(2.0, slot * 0.7)
    baseline = top + plot_h
    parts.append(f'<line x1="{left}" y1="{baseline}" x2="{width - right}" y2="{baseline}" stroke="{AXIS}" class="kv-chart-axis"/>')
    for index, (label, value) in enumerate(bars):
        bar_h = plot_h * value / peak
        x = left + index * slot + (slot - bar_w) / 2
        y = baseline - bar_h
        centre = x + bar_w / 2
        parts.append(
            f'<g class="kv-chart-bar"><rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
            f'fill="{BAR}" class="kv-chart-mark"><title>{_esc(label)}: {_esc(_number(value))}</title></rect>'
            f'<text x="{centre:.1f}" y="{y - 4:.1f}" text-anchor="middle" fill="{TEXT}" class="kv-chart-label" {FONT}>'
            f"{_esc(_number(value))}</text>"
            f'<text x="{centre:.1f}" y="{baseline + 16}" text-anchor="middle" fill="{TEXT}" class="kv-chart-label" {FONT}>'
            f"{_esc(label)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def hbar_chart(
    *,
    chart_id: str,
    title: str,
    description: str,
    bars: Sequence[tuple[str, float | None]],
    max_value: float = 100.0,
    unit: str = "%",
    warn_below: float | None = None,
    width: int = 640,
    row_height: int = 22,
    label_width: int = 170,
    empty: str = "No data",
    missing: str = "no data",
) -> str:
    """Horizontal bars (e.g. coverage per KEK), label on the left, value on the right of each bar.

    A bar whose value is None has nothing to measure: no bar, the text ``missing`` instead.
    """
    height = max(60, 16 + row_height * len(bars))
    parts = _open(chart_id, title, description, width, height)
    if not bars:
        return _empty(parts, width, height, empty)
    plot_w = width - label_width - 60
    parts.append(f'<line x1="{label_width}" y1="8" x2="{label_width}" y2="{height - 8}" stroke="{AXIS}" class="kv-chart-axis"/>')
    for index, (label, value) in enumerate(bars):
        y = 8 + index * row_height
        if value is None:
            bar_w, colour, text = 0.0, BAR_OK, missing
        else:
            bar_w = plot_w * max(0.0, min(value, max_value)) / max_value if max_value else 0
            colour = BAR_WARN if warn_below is not None and value < warn_below else BAR_OK
            text = f"{_number(round(value, 1))}{unit}"
        parts.append(
            f'<g class="kv-chart-bar"><text x="{label_width - 6}" y="{y + row_height * 0.65:.1f}" text-anchor="end" '
            f'fill="{TEXT}" class="kv-chart-label" {FONT}>{_esc(label)}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{bar_w:.1f}" height="{row_height - 6}" fill="{colour}" '
            f'class="{_mark_class(colour)}">'
            f"<title>{_esc(label)}: {_esc(text)}</title></rect>"
            f'<text x="{label_width + bar_w + 4:.1f}" y="{y + row_height * 0.65:.1f}" fill="{TEXT}" class="kv-chart-label" {FONT}>'
            f"{_esc(text)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def timeline_chart(
    *,
    chart_id: str,
    title: str,
    description: str,
    items: Sequence[tuple[str, datetime]],
    start: datetime,
    days: int = 90,
    width: int = 640,
    row_height: int = 20,
    label_width: int = 170,
    empty: str = "Nothing in this period",
) -> str:
    """One row per item: its label, and a marker at its date on a ``start`` … ``start + days`` axis.

    Items before ``start`` (already expired) sit at the left edge in red; items after the end at the right edge.
    """
    height = max(70, 34 + row_height * len(items))
    parts = _open(chart_id, title, description, width, height)
    if not items:
        return _empty(parts, width, height, empty)
    plot_left, plot_right = label_width, width - 90
    plot_w = plot_right - plot_left
    axis_y = height - 20
    end = start + timedelta(days=days)
    parts.append(f'<line x1="{plot_left}" y1="{axis_y}" x2="{plot_right}" y2="{axis_y}" stroke="{AXIS}" class="kv-chart-axis"/>')
    step = 15 if days > 45 else 7
    for offset in range(0, days + 1, step):
        x = plot_left + plot_w * offset / days
        tick = start + timedelta(days=offset)
        parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="{AXIS}" class="kv-chart-axis"/>'
                     f'<text x="{x:.1f}" y="{axis_y + 15}" text-anchor="middle" fill="{TEXT}" class="kv-chart-label" {FONT}>'
                     f"{tick:%m-%d}</text>")
    for index, (label, when) in enumerate(items):
        y = 12 + index * row_height
        fraction = (when - start) / (end - start)
        x = plot_left + plot_w * max(0.0, min(1.0, fraction))
        colour = BAR_WARN if when < start + timedelta(days=min(days, 14)) else BAR
        date_text = f"{when:%Y-%m-%d}" + (" (expired)" if when < start else "")
        parts.append(
            f'<g class="kv-chart-item"><text x="{label_width - 6}" y="{y + 4}" text-anchor="end" fill="{TEXT}" '
            f'class="kv-chart-label" {FONT}>{_esc(label)}</text>'
            f'<line x1="{plot_left}" y1="{y}" x2="{x:.1f}" y2="{y}" stroke="{AXIS}" class="kv-chart-axis" stroke-dasharray="2,3"/>'
            f'<circle cx="{x:.1f}" cy="{y}" r="5" fill="{colour}" class="{_mark_class(colour)}"><title>{_esc(label)}: {_esc(date_text)}</title>'
            f'</circle><text x="{min(x + 8, width - 4):.1f}" y="{y + 4}" fill="{TEXT}" class="kv-chart-label" {FONT}>{_esc(date_text)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
