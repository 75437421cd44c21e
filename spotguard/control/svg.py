"""The drain timeline as a picture (``spotguard status --svg FILE``): plain SVG text, no dependency.

One row per step, a bar from its start to its end, drawn against the notice window (detection to the
VM's deadline). The drain deadline (the VM's minus ``[drain] safety_margin``) and the margin
itself are marked, so an operator sees at a glance which step took the time and how much was left.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

from spotguard.control.render import _span, _when, vm_deadline
from spotguard.notice import utcnow

WIDTH = 980
LABEL_W = 150
RIGHT_W = 190
ROW_H = 26
BAR_H = 16
TOP = 104
MIN_BAR = 2.0
"""Pixels: a step that took a millisecond still shows as a sliver at the moment it ran."""

COLOURS = {
    "ok": "#2e9e4f",
    "failed": "#d64541",
    "timed_out": "#e8871e",
    "handed_over": "#2a9d8f",
    "skipped": "#a7adb4",
    "dry_run": "#4a7bd0",
    "running": "#f2c94c",
}
TEXT_COLOURS = {"running": "#9a7400", "skipped": "#7d838a"}
"""Where a bar's colour is too light for text on white."""
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""


def _nice_step(span: float, ticks: int = 6) -> float:
    """A round tick interval (1, 2 or 5 times a power of ten seconds) giving about ``ticks`` ticks."""
    raw = max(span / ticks, 1e-3)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return float(factor * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def render_svg(doc: dict[str, Any], *, safety_margin: float | None = None, now: datetime | None = None) -> str:
    """The status document's drain timeline as an SVG document.

    The drain deadline is ``drain_deadline`` when the document has one, else the notice's deadline minus
    ``safety_margin`` (the CLI passes ``[drain] safety_margin``), else it is not drawn.
    """
    now = now or utcnow()
    steps = [s for s in doc.get("steps") or [] if isinstance(s, dict)]
    notice = doc.get("notice") if isinstance(doc.get("notice"), dict) else None
    notice_deadline = vm_deadline(doc) if notice else None
    detected = _when(notice.get("detected_at")) if notice else None
    drain_deadline = _when(doc.get("drain_deadline"))
    if drain_deadline is None and notice_deadline is not None and safety_margin is not None:
        drain_deadline = notice_deadline - timedelta(seconds=safety_margin)

    spans: list[tuple[dict[str, Any], datetime | None, datetime | None]] = []
    for step in steps:
        start = _when(step.get("started_at"))
        end = _when(step.get("finished_at"))
        if start is not None and end is None and step.get("state") == "running":
            end = now
        spans.append((step, start, end))
    moments = [m for _, start, end in spans for m in (start, end) if m is not None]
    origin = detected or (min(moments) if moments else now)
    last = max([*moments, *(m for m in (notice_deadline, drain_deadline) if m is not None)], default=origin)
    total = max((last - origin).total_seconds(), 1e-3)

    chart_x0 = LABEL_W + 10
    chart_w = WIDTH - chart_x0 - RIGHT_W
    rows = max(len(spans), 1)
    chart_h = rows * ROW_H
    height = TOP + chart_h + 96

    def x(moment: datetime) -> float:
        return chart_x0 + chart_w * (moment - origin).total_seconds() / total

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" {FONT} font-size="12">',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
    ]
    title = "spotguard drain timeline"
    if notice:
        title += f": {notice.get('source', '?')} {notice.get('kind', '?')} (event {notice.get('event_id', '?')})"
    out.append(f'<text x="12" y="24" font-size="16" font-weight="bold">{escape(title)}</text>')
    out.append(f'<text x="12" y="44" fill="#444">{escape(_subtitle(doc, detected, notice_deadline, drain_deadline))}</text>')

    top, bottom = TOP, TOP + chart_h
    if detected is not None and notice_deadline is not None:
        out.append(f'<rect x="{x(detected):.1f}" y="{top - 6}" width="{x(notice_deadline) - x(detected):.1f}" '
                   f'height="{chart_h + 12}" fill="#eef4fb"><title>notice window</title></rect>')
        out.append(f'<text x="{x(detected) + 4:.1f}" y="{top - 12}" fill="#35618f">notice window '
                   f'{escape(_span((notice_deadline - detected).total_seconds()))}</text>')
    if drain_deadline is not None and notice_deadline is not None and drain_deadline < notice_deadline:
        band = x(notice_deadline) - x(drain_deadline)
        margin = _span((notice_deadline - drain_deadline).total_seconds())
        out.append(f'<rect x="{x(drain_deadline):.1f}" y="{top - 6}" width="{band:.1f}" height="{chart_h + 12}" '
                   f'fill="#f8d7d6"><title>safety margin {escape(margin)}</title></rect>')
        if band >= 7 * len(f"margin {margin}"):
            out.append(f'<text x="{x(drain_deadline) + band / 2:.1f}" y="{bottom - 4}" text-anchor="middle" '
                       f'font-size="11" fill="#b3261e">margin {escape(margin)}</text>')
    for index in range(0, rows, 2):  # zebra rows make a long plan easy to follow across the picture
        out.append(f'<rect x="{chart_x0}" y="{top + index * ROW_H}" width="{chart_w}" height="{ROW_H}" '
                   f'fill="#000000" fill-opacity="0.03"/>')

    step_s = _nice_step(total)
    tick = 0.0
    while tick <= total + 1e-9:
        tx = chart_x0 + chart_w * tick / total
        out.append(f'<line x1="{tx:.1f}" y1="{bottom + 6}" x2="{tx:.1f}" y2="{bottom + 12}" stroke="#666"/>')
        out.append(f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{bottom + 6}" stroke="#000" '
                   f'stroke-opacity="0.06"/>')
        out.append(f'<text x="{tx:.1f}" y="{bottom + 26}" text-anchor="middle" fill="#444">'
                   f'+{escape(_tick_label(tick, step_s))}</text>')
        tick += step_s
    out.append(f'<line x1="{chart_x0}" y1="{bottom + 6}" x2="{chart_x0 + chart_w}" y2="{bottom + 6}" stroke="#666"/>')
    origin_name = "notice detected" if detected is not None else "first step"
    out.append(f'<text x="{chart_x0}" y="{bottom + 42}" fill="#444">seconds after the {origin_name}</text>')

    for index, (step, start, end) in enumerate(spans):
        out += _row(step, start, end, top + index * ROW_H, x)
    if not spans:
        out.append(f'<text x="{chart_x0 + 8}" y="{top + 17}" fill="#444">no drain has run</text>')

    if any(s.get("state") == "running" for s, _, _ in spans):
        mx = x(now)
        out.append(f'<line x1="{mx:.1f}" y1="{top - 6}" x2="{mx:.1f}" y2="{bottom + 6}" stroke="#333" '
                   f'stroke-dasharray="2 2"><title>now</title></line>')
        out.append(f'<text x="{mx + 3:.1f}" y="{bottom + 4}" font-size="11" fill="#333">now</text>')
    # Deadlines last, so they stay visible over the bars they cut through. Their labels end at their
    # lines, on two rows, so neither runs off the picture nor over the other.
    if notice_deadline is not None:
        nx = x(notice_deadline)
        out.append(f'<line x1="{nx:.1f}" y1="{top - 38}" x2="{nx:.1f}" y2="{bottom + 6}" stroke="#6b0f0b" '
                   f'stroke-width="2"><title>notice deadline</title></line>')
        out.append(f'<text x="{nx - 4:.1f}" y="{top - 40}" text-anchor="end" fill="#6b0f0b">notice deadline</text>')
    if drain_deadline is not None:
        dx = x(drain_deadline)
        out.append(f'<line x1="{dx:.1f}" y1="{top - 22}" x2="{dx:.1f}" y2="{bottom + 6}" stroke="#b3261e" '
                   f'stroke-width="2" stroke-dasharray="6 3"><title>drain deadline</title></line>')
        out.append(f'<text x="{dx - 4:.1f}" y="{top - 24}" text-anchor="end" fill="#b3261e">drain deadline</text>')
    out.append(_legend(bottom + 66))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _tick_label(seconds: float, step: float) -> str:
    if step >= 1:
        return f"{seconds:.0f}s"
    return f"{seconds:.{max(0, -math.floor(math.log10(step)))}f}s"


def _subtitle(doc: dict[str, Any], detected: datetime | None, notice_deadline: datetime | None,
              drain_deadline: datetime | None) -> str:
    steps = [s for s in doc.get("steps") or [] if isinstance(s, dict)]
    ends = [e for e in (_when(s.get("finished_at")) for s in steps) if e is not None]
    parts = [f"state {doc.get('state', '?')}"]
    if detected is not None:
        parts.append(f"detected {detected.strftime('%Y-%m-%d %H:%M:%S')}Z")
    if ends and steps and all(s.get("state") == "done" for s in steps):
        end = max(ends)
        if detected is not None:
            parts.append(f"drain over {_span((end - detected).total_seconds())} after the notice")
        target = drain_deadline or notice_deadline
        if target is not None:
            left = (target - end).total_seconds()
            which = "drain deadline" if drain_deadline is not None else "notice deadline"
            parts.append(f"{_span(left)} before the {which}" if left >= 0 else f"{_span(-left)} past the {which}")
    done = sum(1 for s in steps if s.get("state") == "done")
    parts.append(f"{done} of {len(steps)} steps done")
    return " · ".join(parts)


def _row(step: dict[str, Any], start: datetime | None, end: datetime | None, y: int,
         x: Callable[[datetime], float]) -> list[str]:
    name = str(step.get("name", "?"))
    state = str(step.get("state") or "pending")
    outcome = str(step.get("outcome") or ("running" if state == "running" else state))
    detail = " ".join(str(step.get("detail") or "").split())
    mid = y + ROW_H / 2
    lines = [f'<text x="{LABEL_W}" y="{mid + 4:.1f}" text-anchor="end" font-weight="bold">{escape(name)}</text>']
    duration = step.get("duration")
    if isinstance(duration, (int, float)):
        took = _span(float(duration))
    elif start is not None and end is not None:
        took = _span((end - start).total_seconds()) + "…"
    else:
        took = ""
    if start is not None and end is not None:
        x0, x1 = x(start), x(end)
        colour = COLOURS.get(outcome, "#888888")
        tip = f"{name}: {outcome}" + (f", {took}" if took else "") + (f": {detail}" if detail else "")
        lines.append(f'<rect x="{x0:.1f}" y="{mid - BAR_H / 2:.1f}" width="{max(MIN_BAR, x1 - x0):.1f}" '
                     f'height="{BAR_H}" rx="2" fill="{colour}"><title>{escape(tip)}</title></rect>')
    lines.append(f'<text x="{WIDTH - RIGHT_W + 12}" y="{mid + 4:.1f}" fill="{TEXT_COLOURS.get(outcome, COLOURS.get(outcome, "#555555"))}" '
                 f'font-weight="bold">{escape(outcome)}</text>')
    if took:
        lines.append(f'<text x="{WIDTH - 12}" y="{mid + 4:.1f}" text-anchor="end" fill="#333">{escape(took)}</text>')
    return lines


def _legend(y: int) -> str:
    items = [("ok", "ok"), ("handed_over", "handed over"), ("failed", "failed"), ("timed_out", "timed out"),
             ("skipped", "skipped"), ("dry_run", "dry run"), ("running", "running")]
    parts = ['<g font-size="11" fill="#333">']
    lx = 12
    for key, text in items:
        parts.append(f'<rect x="{lx}" y="{y - 9}" width="12" height="10" rx="2" fill="{COLOURS[key]}"/>'
                     f'<text x="{lx + 16}" y="{y}">{escape(text)}</text>')
        lx += 30 + 7 * len(text)
    parts.append(f'<rect x="{lx}" y="{y - 9}" width="12" height="10" fill="#eef4fb" stroke="#35618f" '
                 f'stroke-width="0.5"/><text x="{lx + 16}" y="{y}">notice window</text>')
    lx += 30 + 7 * len("notice window")
    parts.append(f'<rect x="{lx}" y="{y - 9}" width="12" height="10" fill="#f8d7d6"/>'
                 f'<text x="{lx + 16}" y="{y}">safety margin</text>')
    parts.append("</g>")
    return "".join(parts)
