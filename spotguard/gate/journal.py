"""In-memory journal of requests in flight through the gate.

The snapshot step reads it; the gate writes it. Request bodies and outputs are user data: they are
kept here and written to the snapshot store, never logged.

Life of an entry:

1. The gate ``add``\\ s it when a chat/completions request arrives, and appends to ``output`` as the
   engine's answer streams back.
2. A request that ends on its own (finished, failed, or its client went away) is ``remove``\\ d by
   the gate: there is nothing left to migrate.
3. ``interrupt_all()`` (or ``interrupt(id)``) sets ``interrupted``; the gate closes the upstream
   connection (so the engine frees the slot), ends the client's answer with a final "interrupted for
   migration" event, sets ``settled`` and LEAVES the entry in the journal: its ``output`` is then final.
4. The snapshot step reads the interrupted entries and calls ``remove(id)`` once it has saved them.
   ``interrupt_and_wait(timeout)`` does steps 3 and the wait for ``settled`` in one call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

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
    migrated_to: str = ""
    """The peer that took the request over (its base URL) once it answered; "" = not migrated."""
    interrupted: anyio.Event = field(default_factory=anyio.Event)
    """Set to make the gate close the upstream connection (frees the engine's slot)."""
    settled: anyio.Event = field(default_factory=anyio.Event)
    """Set by the gate once it no longer touches this entry: upstream closed, ``output`` final."""
    sync: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    """Brings ``output`` up to date with what the gate has relayed (its parser works in batches)."""

    @property
    def output_text(self) -> str:
        return "".join(self.output)


class JournalAccess(Protocol):
    """What the drain steps use of a journal: this process's ``Journal``, or the gate process's
    through ``gate.link.RemoteJournal``. All calls are async: the journal may live in another process."""

    async def count(self) -> int:
        """Requests in flight right now."""
        ...

    async def entries(self) -> list[InflightRequest]:
        """The requests in flight, with their output so far."""
        ...

    async def interrupt_and_wait(self, timeout: float) -> list[InflightRequest]:
        """Cut every request, wait up to ``timeout`` s until each is settled; returns what was cut."""
        ...

    async def release(self, request_ids: Sequence[str]) -> None:
        """Forget interrupted requests once their records are stored."""
        ...


InterruptListener = Callable[[InflightRequest], None]
"""Called synchronously for each request being interrupted (the gate cancels its upstream read)."""


class Journal:
    """The requests in flight right now, in arrival order."""

    def __init__(self) -> None:
        self._requests: dict[str, InflightRequest] = {}
        self._ids = itertools.count(1)
        self._listeners: list[InterruptListener] = []

    def new_id(self) -> str:
        return f"req-{next(self._ids):08d}"

    def add(self, request: InflightRequest) -> None:
        self._requests[request.id] = request

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def get(self, request_id: str) -> InflightRequest | None:
        return self._requests.get(request_id)

    def active(self) -> list[InflightRequest]:
        """The requests in flight, their ``output`` up to date."""
        requests = list(self._requests.values())
        for request in requests:
            if request.sync is not None:
                request.sync()
        return requests

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[InflightRequest]:
        return iter(list(self._requests.values()))

    def subscribe(self, listener: InterruptListener) -> Callable[[], None]:
        """Call ``listener`` whenever a request is interrupted; returns the unsubscribe function.

        The gate reacts at once through this, even while its upstream read is idle (a long prefill,
        a non-streaming answer), instead of noticing the event at the next chunk.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def interrupt(self, request_id: str) -> InflightRequest | None:
        """Ask the gate to cut one request; returns it, or None if it is no longer in flight."""
        request = self._requests.get(request_id)
        if request is not None and not request.interrupted.is_set():
            request.interrupted.set()
            for listener in list(self._listeners):
                listener(request)
        return request

    def interrupt_all(self) -> list[InflightRequest]:
        """Ask the gate to cut every in-flight upstream stream; returns what was cut."""
        cut = self.active()
        for request in cut:
            self.interrupt(request.id)
        return cut

    # -- JournalAccess ---------------------------------------------------------------------------

    async def count(self) -> int:
        return len(self._requests)

    async def entries(self) -> list[InflightRequest]:
        return self.active()

    async def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.remove(request_id)

    async def interrupt_and_wait(self, timeout: float) -> list[InflightRequest]:
        """``interrupt_all``, then wait up to ``timeout`` s until the gate has settled each one.

        Returns the requests cut; those whose ``settled`` is still unset when time runs out may
        miss their last few tokens (the caller may still save them).
        """
        cut = self.interrupt_all()
        with anyio.move_on_after(timeout):
            for request in cut:
                await request.settled.wait()
        return cut
