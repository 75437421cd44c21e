"""The value every notice source returns, and helpers to build one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

Action = Literal["drain", "observe"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """UTC timestamp with millisecond precision and a trailing Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def stable_id(*parts: str) -> str:
    """An id for events that carry none: the same body always gives the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return digest[:16]


@dataclass(frozen=True, kw_only=True)
class Notice:
    """A cloud (or operator) telling us the VM is going away, or may."""

    source: str
    kind: str
    event_id: str
    deadline: datetime
    detected_at: datetime
    action: Action = "drain"
    act_at: datetime | None = None
    """When to start acting; None = at once. Scheduled maintenance sets it to NotBefore minus a lead."""
    payload: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        """Identity used for de-duplication across polls."""
        return f"{self.source}/{self.kind}/{self.event_id}"

    def due(self, now: datetime | None = None) -> bool:
        """True once the drain should start."""
        return self.act_at is None or (now or utcnow()) >= self.act_at

    def to_json(self) -> dict[str, str | None]:
        return {
            "source": self.source,
            "kind": self.kind,
            "event_id": self.event_id,
            "deadline": rfc3339(self.deadline),
            "detected_at": rfc3339(self.detected_at),
            "action": self.action,
            "act_at": rfc3339(self.act_at) if self.act_at else None,
            "payload": self.payload,
        }

    @classmethod
    def from_json(cls, data: dict[str, str | None]) -> Notice:
        action = data.get("action") or "drain"
        act_at = data.get("act_at")
        return cls(
            source=str(data["source"]),
            kind=str(data["kind"]),
            event_id=str(data["event_id"]),
            deadline=parse_rfc3339(str(data["deadline"])),
            detected_at=parse_rfc3339(str(data["detected_at"])),
            action="observe" if action == "observe" else "drain",
            act_at=parse_rfc3339(act_at) if act_at else None,
            payload=data.get("payload") or "",
        )


def window(seconds: float, now: datetime | None = None) -> datetime:
    """Deadline ``seconds`` from now, for notices that carry no time of their own."""
    return (now or utcnow()) + timedelta(seconds=seconds)


class NoticeSource(Protocol):
    """Where notices come from. Sources report; they never act.

    ``poll`` returns every notice that is live right now (an empty list when none is). A notice that
    was returned before and is missing now has been withdrawn. A hanging source (``hanging = True``)
    blocks inside ``poll`` until something changes or its own wait ends, so the runner does not sleep
    between its polls; otherwise it sleeps ``interval`` between them. Failures raise ``MetadataError``; the runner counts and retries them.
    """

    name: str
    hanging: bool
    interval: float | None
    """Seconds between polls when not hanging; None = ``[agent] poll_interval``."""

    async def poll(self) -> Sequence[Notice]: ...

    async def aclose(self) -> None: ...


def dumps(notices: Sequence[Notice]) -> str:
    return json.dumps([n.to_json() for n in notices], sort_keys=True)
