"""``spotguard status`` as text: the state, the notice, and the drain's timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from spotguard.notice import parse_rfc3339, utcnow

DETAIL_WIDTH = 60
NO_STEPS = {"draining": "running; no step has reported yet", "drained": "finished; no step was recorded"}
"""What the timeline says before a drain's first step is recorded (or of a drain that recorded none)."""


def _when(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def _span(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{sign}{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{sign}{hours}h{minutes:02d}m"


def _clock(moment: datetime | None) -> str:
    return moment.strftime("%H:%M:%S.%f")[:-3] + "Z" if moment else "-"


def vm_deadline(doc: dict[str, Any]) -> datetime | None:
    """When the VM goes away: the node's deadline (the earliest notice's), else the notice's own."""
    deadline, notice = doc.get("deadline"), doc.get("notice")
    if isinstance(deadline, dict) and _when(deadline.get("vm")) is not None:
        return _when(deadline.get("vm"))
    return _when(notice.get("deadline")) if isinstance(notice, dict) else None


def _notice_lines(doc: dict[str, Any], now: datetime) -> list[str]:
    notice = doc.get("notice")
    if not isinstance(notice, dict):
        return ["notice:   none"]
    deadline = vm_deadline(doc)
    detected = _when(notice.get("detected_at"))
    lines = [f"notice:   {notice.get('source', '?')} {notice.get('kind', '?')} (event {notice.get('event_id', '?')})"]
    if deadline is not None:
        left = (deadline - now).total_seconds()
        when = f"in {_span(left)}" if left >= 0 else f"passed {_span(-left)} ago"
        setter = doc.get("deadline")
        if isinstance(setter, dict) and (setter.get("source"), setter.get("kind")) != \
                (notice.get("source"), notice.get("kind")):
            when += f"; brought forward by a {setter.get('source', '?')} {setter.get('kind', '?')} notice"
        lines.append(f"deadline: {deadline.isoformat().replace('+00:00', 'Z')} ({when})")
    if detected is not None:
        lines.append(f"detected: {detected.isoformat().replace('+00:00', 'Z')}")
    return lines


def format_status(doc: dict[str, Any], *, now: datetime | None = None) -> str:
    """A readable status: state, readiness, notice, and each drain step (then each undrain step) with
    outcome, duration and detail.

    LEFT is the time to the deadline (``drain_deadline`` when the document has one, else the
    notice's) at the moment the step ended.
    """
    now = now or utcnow()
    state = doc.get("state", "unknown")
    lines = [f"state:    {state}" + (" (dry run)" if doc.get("dry_run") else ""),
             f"cloud:    {doc.get('cloud') or 'none'}"]
    readiness = doc.get("readiness")
    if isinstance(readiness, dict):
        failing = [str(f) for f in readiness.get("failing") or []]
        lines.append("ready:    " + ("yes" if readiness.get("ready") else "no: " + "; ".join(failing)))
    lines += _notice_lines(doc, now)
    steps = [s for s in doc.get("steps") or [] if isinstance(s, dict)]
    if not steps:
        lines.append("drain:    " + NO_STEPS.get(str(state), "no drain has run"))
        return "\n".join(lines) + "\n"
    lines += _table(steps, _when(doc.get("drain_deadline")) or vm_deadline(doc), now)
    result = doc.get("drain_result")
    if isinstance(result, str) and result != "running":
        lines.append(f"result:   {result}")
    restore = [s for s in doc.get("restore_steps") or [] if isinstance(s, dict)]
    if restore:
        lines += ["", "undrain: what was put back"] + _table(restore, None, now)
    return "\n".join(lines) + "\n"


def _table(steps: list[dict[str, Any]], deadline: datetime | None, now: datetime) -> list[str]:
    lines: list[str] = []
    width = max(len("STEP"), *(len(str(s.get("name", ""))) for s in steps))
    lines.append("")
    lines.append(f"{'STEP':<{width}}  {'STATE':<7}  {'OUTCOME':<11}  {'STARTED':<13}  {'DURATION':>8}  "
                 f"{'LEFT':>8}  DETAIL")
    for step in steps:
        state_text = str(step.get("state") or "pending")
        outcome = str(step.get("outcome") or "-")
        duration = step.get("duration")
        started = _when(step.get("started_at"))
        if isinstance(duration, (int, float)):
            took = _span(float(duration))
        elif state_text == "running" and started is not None:
            took = _span((now - started).total_seconds()) + "…"
        else:
            took = "-"
        # Time left to the deadline when the step ended (or now, while it runs): the slack it kept.
        end = _when(step.get("finished_at")) or (now if state_text == "running" else None)
        left = _span((deadline - end).total_seconds()) if deadline is not None and end is not None else "-"
        detail = " ".join(str(step.get("detail") or "").split())
        if len(detail) > DETAIL_WIDTH:
            detail = detail[:DETAIL_WIDTH - 1] + "…"
        lines.append(f"{str(step.get('name', '?')):<{width}}  {state_text:<7}  {outcome:<11}  "
                     f"{_clock(started):<13}  {took:>8}  {left:>8}  {detail}".rstrip())
    done = [s for s in steps if s.get("state") == "done"]
    lines.append("")
    lines.append(f"{len(done)} of {len(steps)} steps done")
    return lines
