"""In-memory journal of requests in flight through the gate.

The snapshot step reads it; the gate writes it. Request bodies and outputs are user data: they are
kept here and written to the snapshot store, never logged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator

import anyio

from spotguard.notice import utcnow


@dataclass(kw_only=True)
class InflightRequest:
    """One request the engine is working on. ``body`` is the original request body, unchanged."""

    id: str
    endpoint: str
    model: str
    body: bytes
    stream: bool
    started_at: datetime = field(default_factory=utcnow)
    output: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    slot_id: int | None = None
    """llama.cpp slot serving it, where the engine reports one."""
    interrupted: anyio.Event = field(default_factory=anyio.Event)
    """Set to make the gate close the upstream connection (frees the engine's slot)."""

    @property
    def output_text(self) -> str:
        return "".join(self.output)


class Journal:
    """The requests in flight right now, in arrival order."""

    def __init__(self) -> None:
        self._requests: dict[str, InflightRequest] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[], None]] = []

    def new_id(self) -> str:
        return f"req-{next(self._ids):08d}"

    def add(self, request: InflightRequest) -> None:
        self._requests[request.id] = request

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def active(self) -> list[InflightRequest]:
        return list(self._requests.values())

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[InflightRequest]:
        return iter(list(self._requests.values()))

    def interrupt_all(self) -> list[InflightRequest]:
        """Ask the gate to cut every in-flight upstream stream; returns what was cut."""
        cut = self.active()
        for request in cut:
            request.interrupted.set()
        return cut
