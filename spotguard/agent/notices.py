"""The notice book: every notice live right now, by source; new ones counted once, missing ones withdrawn.

A notice is known by its key (source/kind/event id). Each poll reports every notice its source holds, so
the same notice comes back again and again: it is new only the first time, and withdrawn the first poll
that no longer shows it. When it was first seen is the source's to keep (``clouds/_parse.FirstSeen``): a
deadline counted from detection must stay put across polls, and only the source knows which deadlines
are. Operator notices (a manual drain, the OS shutdown) are put in with ``inject``.

Keys an operator forced away (``undrain --force``) are suppressed: never due, until the notice is withdrawn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import anyio

from spotguard.metrics import Metrics
from spotguard.notice import Notice

OPERATOR_SOURCES = ("manual", "shutdown")


def public_notice(notice: Notice | None) -> dict[str, Any] | None:
    """The notice as /status and the logs show it. The raw payload is metadata, not user data, but long."""
    if notice is None:
        return None
    doc: dict[str, Any] = dict(notice.to_json())
    doc.pop("payload", None)
    return doc


class NoticeBook:
    """The live notices of every source, and the keys an operator suppressed."""

    def __init__(self, *, metrics: Metrics, log: Any, suppressed: Iterable[str] = ()) -> None:
        self._metrics = metrics
        self._log = log
        self._live: dict[str, dict[str, Notice]] = {}
        self._suppressed = set(suppressed)
        self._changed = anyio.Event()
        self._on_suppressed: list[Callable[[tuple[str, ...]], None]] = []

    # ---- what the node reads -----------------------------------------------------------------------

    def live(self) -> list[Notice]:
        return [n for by_key in self._live.values() for n in by_key.values()]

    def observed(self) -> list[Notice]:
        """Live notices that only inform (a rebalance recommendation by default)."""
        return [n for n in self.live() if n.action == "observe"]

    def cloud_drains(self) -> list[Notice]:
        """Live drain notices from the platform (not an operator's), not suppressed: the VM is going away."""
        return [n for n in self.live() if n.action == "drain" and n.source not in OPERATOR_SOURCES
                and n.key not in self._suppressed]

    def due(self, now: datetime) -> list[Notice]:
        """Drain notices due by ``now`` and not suppressed, the earliest deadline first."""
        return sorted((n for n in self.live() if n.action == "drain" and n.due(now) and n.key not in self._suppressed),
                      key=lambda n: n.deadline)

    def seconds_to_next_due(self, now: datetime) -> float | None:
        """Seconds until the next scheduled drain notice comes due (None: none is waiting)."""
        waits = [(n.act_at - now).total_seconds() for n in self.live()
                 if n.action == "drain" and n.act_at and not n.due(now) and n.key not in self._suppressed]
        return max(0.0, min(waits)) if waits else None

    def changed(self) -> Awaitable[None]:
        """Resolves at the next change of the book (bound when called: call it before looking)."""
        if self._changed.is_set():
            self._changed = anyio.Event()
        return self._changed.wait()

    def look_again(self) -> None:
        """Wake whoever waits on ``changed``: the node moved on, and what is due may now mean something else."""
        self._changed.set()

    @property
    def suppressed(self) -> tuple[str, ...]:
        return tuple(sorted(self._suppressed))

    def on_suppressed(self, listener: Callable[[tuple[str, ...]], None]) -> None:
        """Call ``listener`` with the suppressed keys whenever they change (the node persists them)."""
        self._on_suppressed.append(listener)

    # ---- what changes it -----------------------------------------------------------------------------

    def report(self, source: str, notices: Sequence[Notice]) -> list[Notice]:
        """What ``source`` holds now: the new notices are counted and returned, missing ones withdrawn."""
        previous = self._live.get(source, {})
        current = {notice.key: notice for notice in notices}
        new = [notice for key, notice in current.items() if key not in previous]
        for notice in new:
            self._on_new(notice)
        for key, gone in previous.items():
            if key not in current:
                self._on_withdrawn(gone)
        self._live[source] = current
        self._changed.set()
        return new

    def inject(self, notice: Notice) -> None:
        """Add an operator notice (manual drain, OS shutdown) as if a source had reported it."""
        current = self._live.setdefault(notice.source, {})
        if notice.key not in current:
            self._on_new(notice)
        current[notice.key] = notice
        self._changed.set()

    def forget_operator_notices(self) -> None:
        """An undrain: the operator's own notices (manual drain, shutdown) are over."""
        for source in OPERATOR_SOURCES:
            self._live.pop(source, None)
        self._changed.set()

    def suppress(self, keys: Iterable[str]) -> None:
        """Ignore these cloud notices until their source withdraws them (``undrain --force``)."""
        self._suppressed.update(keys)
        self._suppressed_changed()
        self._changed.set()

    def _on_new(self, notice: Notice) -> None:
        self._metrics.notices.labels(source=notice.source, kind=notice.kind, action=notice.action).inc()
        self._log.warning("notice", **public_notice(notice) or {})

    def _on_withdrawn(self, notice: Notice) -> None:
        if notice.key in self._suppressed:
            self._suppressed.discard(notice.key)
            self._suppressed_changed()
        self._metrics.withdrawals.labels(source=notice.source, kind=notice.kind).inc()
        self._log.warning("notice_withdrawn", source=notice.source, kind=notice.kind, event_id=notice.event_id)

    def _suppressed_changed(self) -> None:
        for listener in self._on_suppressed:
            listener(self.suppressed)
