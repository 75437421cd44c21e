"""The gate's in-flight requests as the drain steps see them.

The gate owns its requests (``gate/registry.py``); a drain step reads ``JournalEntry`` copies
(``gate/protocol.py``) through ``JournalAccess``: the gate process's registry over its control socket
(``gate/link.RemoteJournal``) or, with the gate in the same process (tests, benches), ``LocalJournal``.
Request bodies and outputs are user data: kept, stored in snapshots, never logged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Protocol

from spotguard.gate.protocol import EntryState, JournalEntry


class JournalAccess(Protocol):
    """What the drain steps use of the gate's requests. All calls are async: the gate may be another process."""

    async def count(self) -> int:
        """Requests the engine is answering right now."""
        ...

    async def entries(self) -> list[JournalEntry]:
        """The journaled requests, with their output so far."""
        ...

    async def interrupt_and_wait(self, timeout: float) -> list[JournalEntry]:
        """Continue every running request on a peer (with ``[gate] peers``) or cut it; returns every request
        listed (those handed over earlier too), final. ``timeout`` bounds the call."""
        ...

    async def release(self, request_ids: Sequence[str]) -> None:
        """Forget interrupted requests once their records are stored."""
        ...


class Journaled(Protocol):
    """What ``LocalJournal`` needs of the gate (``proxy.Gate``)."""

    @property
    def inflight(self) -> int: ...

    def journal_entries(self) -> list[JournalEntry]: ...

    def interrupt_all(self) -> list[JournalEntry]: ...

    def release(self, request_ids: Sequence[str]) -> int: ...


class LocalJournal:
    """``JournalAccess`` on a gate in this process."""

    def __init__(self, gate: Journaled) -> None:
        self._gate = gate

    async def count(self) -> int:
        return self._gate.inflight

    async def entries(self) -> list[JournalEntry]:
        return self._gate.journal_entries()

    async def interrupt_and_wait(self, timeout: float) -> list[JournalEntry]:
        del timeout  # in one process the gate settles each request as it interrupts it
        return self._gate.interrupt_all()

    async def release(self, request_ids: Sequence[str]) -> None:
        self._gate.release(request_ids)


class EntryJournal:
    """``JournalAccess`` over fixed entries, behaving as a gate holding exactly them would: an interrupt
    makes the running ones final (cut), a release forgets only final ones. For benches and tests that
    exercise a drain step without a gate process."""

    def __init__(self, entries: Sequence[JournalEntry] = ()) -> None:
        self._entries = {entry.id: entry for entry in entries}

    def add(self, entry: JournalEntry) -> None:
        self._entries[entry.id] = entry

    def discard(self, request_id: str) -> None:
        """The request ended on its own (finished, failed, client gone): nothing left to save."""
        self._entries.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[JournalEntry]:
        return iter(list(self._entries.values()))

    async def count(self) -> int:
        return sum(1 for entry in self._entries.values() if not entry.final)

    async def entries(self) -> list[JournalEntry]:
        return list(self._entries.values())

    async def interrupt_and_wait(self, timeout: float) -> list[JournalEntry]:
        del timeout
        cut = [replace(entry, state=EntryState.CUT) for entry in self._entries.values() if not entry.final]
        self._entries.update((entry.id, entry) for entry in cut)
        return list(self._entries.values())

    async def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            entry = self._entries.get(request_id)
            if entry is not None and entry.final:
                del self._entries[request_id]
