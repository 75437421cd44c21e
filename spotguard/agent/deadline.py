"""The one owner of the node's deadline: the earliest notice wins, and every change reaches everyone at once.

    notice ──> DeadlineOwner.adopt ──┬─> the node's state (persisted, /status)
                                     ├─> the running drain's step scopes (EngineDriver.tighten)
                                     ├─> the gate (Wiring -> GateLink.declare), also once the drain is over:
                                     │   the answers it relays from peers outlive the drain
                                     └─> the spotguard_drain_deadline_timestamp_seconds gauge

A listener gets the current deadline as soon as it starts listening, then every change: the gate link,
which starts listening before it attaches, holds a restarted daemon's deadline (rebuilt from the persisted
state) from its first exchange with the gate. The deadline is set when a drain starts, only ever moves
earlier while the node is draining or drained, and is cleared by an undrain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spotguard.deadline import Deadline
from spotguard.metrics import Metrics
from spotguard.notice import Notice, rfc3339

Listener = Callable[[Deadline | None], None]


class DeadlineOwner:
    """Holds the node's ``Deadline`` (None while no drain is under way) and publishes each change."""

    def __init__(self, margin: float, *, metrics: Metrics, log: Any) -> None:
        self.margin = margin
        """``[drain] safety_margin``: ``Deadline.for_notice`` takes it off the notice's deadline."""
        self._metrics = metrics
        self._log = log
        self._current: Deadline | None = None
        self._listeners: list[Listener] = []

    @property
    def current(self) -> Deadline | None:
        return self._current

    def for_notice(self, notice: Notice) -> Deadline:
        """The deadline ``notice`` would set (a dry run uses it without adopting it)."""
        return Deadline.for_notice(notice, self.margin)

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` with the current deadline now, and with every change after."""
        self._listeners.append(listener)
        self._tell(listener)

    def adopt(self, notice: Notice) -> bool:
        """Take ``notice``'s deadline when the VM goes away sooner by it (or there is none yet); True if so."""
        deadline = self.for_notice(notice)
        current = self._current
        if not deadline.earlier_than(current):
            return False
        if current is not None:
            self._log.warning("deadline_tightened", old=rfc3339(current.vm), new=rfc3339(deadline.vm),
                              by_source=notice.source, by_kind=notice.kind)
        self._set(deadline)
        return True

    def restore(self, deadline: Deadline | None) -> None:
        """The deadline a restarted daemon read back from its state (before anything listens)."""
        self._set(deadline)

    def clear(self) -> None:
        """No deadline any more: an undrain put the node back into service."""
        if self._current is not None:
            self._set(None)

    def _set(self, deadline: Deadline | None) -> None:
        self._current = deadline
        self._metrics.deadline.set(deadline.vm.timestamp() if deadline else 0)
        for listener in self._listeners:
            self._tell(listener)

    def _tell(self, listener: Listener) -> None:
        try:
            listener(self._current)
        except Exception as exc:  # one listener's bug must not keep the deadline from the others
            self._log.exception("deadline_listener_failed", error=f"{type(exc).__name__}: {exc}")
            self._metrics.config_errors.labels(component="deadline", reason="listener").inc()
