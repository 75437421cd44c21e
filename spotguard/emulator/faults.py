"""Fault injection: an ordered queue of faults, each matching a path prefix, consumed per request.

A request takes the first live fault whose prefix matches; that fault's ``count`` (if any) goes down
by one, and it is dropped when spent or when its ``duration`` has passed. So ``503 x2`` followed by
``latency 3 s x1`` plays out in that order on the same path.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from spotguard.emulator.wire import BadRequest, Params


@dataclass(frozen=True, kw_only=True)
class Fault:
    """What to do to a matching metadata request; effects apply in field order below."""

    fault_id: str
    path: str
    latency: float = 0.0
    """Seconds to wait before answering (or before the other effects)."""
    expire_tokens: bool = False
    """AWS: invalidate every IMDSv2 token issued so far, then answer normally (so: 401)."""
    drop: bool = False
    """Start the response, then cut the connection: the client sees a transport error."""
    status: int | None = None
    body: str = ""
    content_type: str = "text/plain"
    count: int | None = None
    """How many requests it still applies to; None = until cleared or expired."""
    expires_at: float | None = None
    """time.monotonic() after which it no longer applies; None = never."""

    def to_json(self) -> dict[str, Any]:
        return {
            "fault_id": self.fault_id, "path": self.path, "latency": self.latency,
            "expire_tokens": self.expire_tokens, "drop": self.drop, "status": self.status,
            "body": self.body, "content_type": self.content_type, "count": self.count,
            "seconds_left": None if self.expires_at is None else max(0.0, self.expires_at - time.monotonic()),
        }


def parse_fault(data: Mapping[str, Any], fault_id: str) -> Fault:
    p = Params(data, "fault")
    path = p.text("path", "/")
    if not path.startswith("/"):
        raise BadRequest(f"fault: 'path' must start with '/', got {path!r}")
    status = p.optional_integer("status")
    if status is not None and not 100 <= status <= 599:
        raise BadRequest(f"fault: 'status' must be an HTTP status 100..599, got {status}")
    latency = p.number("latency", 0.0)
    count = p.optional_integer("count")
    duration = p.optional_number("duration")
    fault = Fault(
        fault_id=fault_id, path=path, latency=latency, status=status,
        expire_tokens=p.flag("expire_tokens", False), drop=p.flag("drop", False),
        body=p.text("body", ""), content_type=p.text("content_type", "text/plain"), count=count,
        expires_at=None if duration is None else time.monotonic() + duration,
    )
    p.done()
    if latency < 0 or (count is not None and count < 1) or (duration is not None and duration <= 0):
        raise BadRequest("fault: 'latency' must be >= 0, 'count' >= 1 and 'duration' > 0")
    if not (latency or fault.expire_tokens or fault.drop or status is not None):
        raise BadRequest("fault: give at least one of status, latency, drop, expire_tokens")
    return fault


class FaultQueue:
    """The faults of one emulator, in the order they were added."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, data: Mapping[str, Any]) -> Fault:
        fault = parse_fault(data, f"fault-{next(self._ids)}")
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        self._faults.clear()

    def remove(self, fault_id: str) -> bool:
        before = len(self._faults)
        self._faults = [f for f in self._faults if f.fault_id != fault_id]
        return len(self._faults) != before

    def listing(self) -> list[dict[str, Any]]:
        self._expire()
        return [fault.to_json() for fault in self._faults]

    def take(self, path: str) -> Fault | None:
        """The fault that applies to one request on ``path`` (consuming one of its uses), if any."""
        self._expire()
        for index, fault in enumerate(self._faults):
            if path.startswith(fault.path):
                if fault.count is None:
                    return fault
                if fault.count <= 1:
                    del self._faults[index]
                else:
                    self._faults[index] = replace(fault, count=fault.count - 1)
                return fault
        return None

    def _expire(self) -> None:
        now = time.monotonic()
        self._faults = [f for f in self._faults if f.expires_at is None or f.expires_at > now]
