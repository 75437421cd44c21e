"""The gate's in-flight requests: one registry, owned by the gate, that the daemon reads copies of.

A chat/completions request becomes a ``Flight`` once its body is in. The exchange answering it feeds its
``OutputParser``; the gate decides, when the daemon asks, whether to continue it on a peer or cut it; the
daemon sees ``JournalEntry`` copies (``gate/protocol.py``), never the live object.

Life of a flight:

1. ``add``: the body is in and the request goes to the engine (state ``running``).
2. It ends on its own (finished, failed, client gone): the exchange ``remove``\\ s it - nothing to save.
3. The drain interrupts it (``Gate.interrupt_all``): continued on a peer (``migrated``) or cut for the
   snapshot (``cut``). Either way its output is final and it STAYS here until the snapshot step has
   stored its record and calls ``release``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Protocol

from spotguard.gate.output import OutputParser
from spotguard.gate.protocol import EntryState, JournalEntry

READ_CHECK = 16
"""A streamed answer that ends on its own is read only as far as somebody asked (a drain) or its parser
read batches (``output.BATCH_BYTES``): one flight in ``READ_CHECK`` (the first one included) is read to
its end anyway, so that an engine whose stream the gate cannot read still shows, counted ``malformed`` and
logged, long before a drain depends on reading it. Reading every answer to its end cost about a fifth of
the gate's CPU at 200 streams (docs/benchmarks.md). A non-streaming answer is one JSON body: always read."""


class FlightOwner(Protocol):
    """The exchange answering a flight: the gate tells it to stop, and where its answer goes on."""

    def interrupt(self, *, migrate: bool) -> None: ...

    def movable(self) -> bool:
        """A peer could continue it now (the request allows it, and its answer so far can be read)."""
        ...


class _LetGo:
    """The owner of a flight its exchange let go of (it ended, or handed the request to a peer)."""

    def interrupt(self, *, migrate: bool) -> None:
        """Nothing runs here any more."""

    def movable(self) -> bool:
        return False


LET_GO: FlightOwner = _LetGo()


class Flight:
    """One journaled request. ``body`` is the request body, unchanged; user data, never logged."""

    __slots__ = ("id", "endpoint", "model", "body", "stream", "started_at", "state", "migrated_to", "parser",
                 "owner", "limit", "first_token_at", "looked", "checked")

    def __init__(self, *, id: str, endpoint: str, model: str, body: bytes, stream: bool, parser: OutputParser,
                 owner: FlightOwner, started_at: float | None = None, limit: int | None = None) -> None:
        self.id = id
        self.endpoint = endpoint
        self.model = model
        self.body = body
        self.stream = stream
        self.started_at = time.time() if started_at is None else started_at
        """Unix time (a datetime only in the copies: building one per request showed in the gate's profile)."""
        self.state = EntryState.RUNNING
        self.migrated_to = ""
        """The peer that took the request over (its base URL) once it answered."""
        self.parser = parser
        self.owner = owner
        self.limit = limit
        """The most output tokens the request may produce, when it says (``estimate.token_limit``)."""
        self.first_token_at: float | None = None
        """Event-loop time the engine's answer began to arrive: the start of its pace."""
        self.looked: tuple[float, int] | None = None
        """(event-loop time, tokens delivered) at the gate's last look at its pace, while draining."""
        self.checked = False
        """Its answer is read to the end even if it ends on its own (``READ_CHECK``)."""

    def let_go(self) -> None:
        """Its exchange is done with it. The flight no longer refers to the exchange: the two referring to each
        other left every request to the cyclic garbage collector, whose collections (~16 ms every few thousand
        requests) showed in the gate's tail latency."""
        self.owner = LET_GO

    def entry(self) -> JournalEntry:
        """A copy as it stands now (the parser is brought up to date first)."""
        parser = self.parser
        parser.flush()
        return JournalEntry(id=self.id, endpoint=self.endpoint, model=self.model, body=self.body,
                            stream=self.stream, started_at=datetime.fromtimestamp(self.started_at, UTC), output=parser.text,
                            finish_reason=parser.finish_reason, slot_id=parser.slot_id, state=self.state,
                            migrated_to=self.migrated_to, tokens=parser.content_events)


class Registry:
    """The flights, in arrival order."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._ids = itertools.count(1)
        self._added = 0

    def new_id(self) -> str:
        return f"req-{next(self._ids):08d}"

    def add(self, flight: Flight) -> None:
        flight.checked = self._added % READ_CHECK == 0
        self._added += 1
        self._flights[flight.id] = flight

    def remove(self, flight_id: str) -> None:
        self._flights.pop(flight_id, None)

    def get(self, flight_id: str) -> Flight | None:
        return self._flights.get(flight_id)

    def __len__(self) -> int:
        return len(self._flights)

    def running(self) -> list[Flight]:
        return [f for f in self._flights.values() if f.state is EntryState.RUNNING]

    def entries(self) -> list[JournalEntry]:
        return [flight.entry() for flight in list(self._flights.values())]

    def release(self, flight_ids: Iterable[str]) -> int:
        """Forget flights whose records are stored; running ones stay (their exchange removes them)."""
        released = 0
        for flight_id in flight_ids:
            flight = self._flights.get(flight_id)
            if flight is not None and flight.state is not EntryState.RUNNING:
                del self._flights[flight_id]
                released += 1
        return released
