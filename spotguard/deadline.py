"""The node's deadline as one value: when the VM goes away, and when the drain must be over by.

    deadline = Deadline.for_notice(notice, config.drain.safety_margin)
    deadline.vm       # the notice's deadline: the gate ends what it relays from peers just before it
    deadline.drain    # vm minus [drain] safety_margin: what the drain's steps work to

The margin is subtracted here and nowhere else. The agent's ``DeadlineOwner`` (``agent/deadline.py``)
holds the current one (the earliest notice wins) and hands every change to the drain, the gate, status and
metrics. It sits beside ``notice.py``, low in the layers, so that the gate link can carry it without
importing the agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from spotguard.notice import Notice, parse_rfc3339, rfc3339, utcnow


@dataclass(frozen=True, kw_only=True)
class Deadline:
    """When the VM goes away (``vm``) and when the drain must be over (``drain``), and which notice said so."""

    vm: datetime
    drain: datetime
    source: str
    """The source and kind of the notice that set it (the earliest one)."""
    kind: str

    @classmethod
    def for_notice(cls, notice: Notice, margin: float) -> Deadline:
        """``notice``'s deadline, with the drain's ``margin`` seconds (``[drain] safety_margin``) before it."""
        return cls(vm=notice.deadline, drain=notice.deadline - timedelta(seconds=margin), source=notice.source,
                   kind=notice.kind)

    def earlier_than(self, other: Deadline | None) -> bool:
        """True when the VM goes away sooner by this deadline than by ``other`` (None: no deadline yet)."""
        return other is None or self.vm < other.vm

    def seconds_left(self, now: datetime | None = None) -> float:
        """Seconds until the drain must be over (negative once it is past)."""
        return (self.drain - (now or utcnow())).total_seconds()

    def vm_seconds_left(self, now: datetime | None = None) -> float:
        """Seconds until the VM goes away."""
        return (self.vm - (now or utcnow())).total_seconds()

    def to_json(self) -> dict[str, str]:
        return {"vm": rfc3339(self.vm), "drain": rfc3339(self.drain), "source": self.source, "kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Deadline:
        """Raises ``ValueError`` (or ``KeyError``) on a document that is not one."""
        return cls(vm=parse_rfc3339(str(data["vm"])), drain=parse_rfc3339(str(data["drain"])),
                   source=str(data["source"]), kind=str(data["kind"]))
