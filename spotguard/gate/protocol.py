"""What the daemon and the gate say to each other: one module, imported by both sides.

The daemon (control plane) never commands the gate (data plane) step by step. On every change, and on
every (re)attach, it *declares* the state it wants - ``DesiredState`` - and the gate converges on it and
answers with what it now holds (``HeldState``). A restarted daemon, an earlier notice and a gate restarted
by hand are then all the same path: declare again. (Envoy's model: the control plane states, the data
plane converges.)

The in-flight requests travel the other way as ``JournalEntry`` values: frozen copies of what the gate
holds at the moment it answers. They carry request bodies and outputs: user data, sent only over the
gate's 0600 control socket and never logged.

Times on the wire are Unix seconds (floats): the only place a deadline changes form is here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from spotguard.errors import GateError
from spotguard.notice import utcnow


def _time(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GateError(f"{what} must be a Unix time or null")
    return float(value)


def _when(at: datetime | None) -> float | None:
    return at.timestamp() if at is not None else None


@dataclass(frozen=True, kw_only=True)
class DesiredState:
    """What the daemon wants the gate to hold.

    ``generation`` grows with every declaration of one daemon run, so an answer can be matched to what it
    answers; a new daemon run starts again at 1 (the gate adopts whatever it is told).
    """

    generation: int
    draining: bool
    """Refuse (or hand to peers) new requests."""
    vm_deadline: datetime | None = None
    """When the VM goes away: answers still relayed end with a retryable error just before it."""
    drain_deadline: datetime | None = None
    """When the drain must be over (the VM deadline less the safety margin)."""
    peers: tuple[str, ...] | None = None
    """Base URLs that take work over while draining (``[gate] peers``); None = the gate's own setting."""

    def to_wire(self) -> dict[str, Any]:
        return {"generation": self.generation, "draining": self.draining,
                "vm_deadline": _when(self.vm_deadline), "drain_deadline": _when(self.drain_deadline),
                "peers": list(self.peers) if self.peers is not None else None}

    @classmethod
    def from_wire(cls, doc: Any) -> DesiredState:
        if not isinstance(doc, dict):
            raise GateError("declare: 'state' must be an object")
        generation, draining = doc.get("generation"), doc.get("draining")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise GateError("declare: 'generation' must be a non-negative integer")
        if not isinstance(draining, bool):
            raise GateError("declare: 'draining' must be true or false")
        vm = _time(doc.get("vm_deadline"), "declare: 'vm_deadline'")
        drain = _time(doc.get("drain_deadline"), "declare: 'drain_deadline'")
        peers = doc.get("peers")
        if peers is not None and (not isinstance(peers, list) or not all(isinstance(p, str) for p in peers)):
            raise GateError("declare: 'peers' must be a list of base URLs or null")
        return cls(generation=generation, draining=draining,
                   vm_deadline=datetime.fromtimestamp(vm, UTC) if vm is not None else None,
                   drain_deadline=datetime.fromtimestamp(drain, UTC) if drain is not None else None,
                   peers=tuple(peers) if peers is not None else None)


@dataclass(frozen=True, kw_only=True)
class HeldState:
    """What the gate holds now: the state it converged on, and what it is doing about it."""

    state: DesiredState
    inflight: int
    """Requests the local engine is answering."""
    relayed: int
    """Answers the gate relays from peers (they outlive the drain, until the VM's deadline)."""

    def to_wire(self) -> dict[str, Any]:
        return {**self.state.to_wire(), "inflight": self.inflight, "relayed": self.relayed}

    @classmethod
    def from_wire(cls, doc: Any) -> HeldState:
        state = DesiredState.from_wire(doc)
        inflight, relayed = doc.get("inflight", 0), doc.get("relayed", 0)
        if not isinstance(inflight, int) or not isinstance(relayed, int):
            raise GateError("the gate's held state has no request counts")
        return cls(state=state, inflight=inflight, relayed=relayed)

    def holds(self, wanted: DesiredState) -> bool:
        """The gate converged on ``wanted`` (generations aside: a gate restarted by hand knows none)."""
        return (self.state.draining == wanted.draining and _same(self.state.vm_deadline, wanted.vm_deadline)
                and _same(self.state.drain_deadline, wanted.drain_deadline)
                and (wanted.peers is None or self.state.peers == wanted.peers))


def _same(a: datetime | None, b: datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs((a - b).total_seconds()) < 1e-3  # a float's round trip through JSON


class EntryState(StrEnum):
    """Where a journaled request stands, as the drain steps need to know it."""

    RUNNING = "running"
    """The local engine is still answering it."""
    CUT = "cut"
    """Cut for the snapshot: its output is final; it stays listed until released."""
    MIGRATED = "migrated"
    """Its local part is final and a peer continues it (the gate relays the answer); listed until released."""


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """One request the gate journaled, as it stood when the gate answered. ``body`` is the request body,
    unchanged; ``output`` the text the client has had so far."""

    id: str
    endpoint: str
    model: str
    body: bytes
    stream: bool
    started_at: datetime = field(default_factory=utcnow)
    output: str = ""
    finish_reason: str | None = None
    slot_id: int | None = None
    """The llama.cpp slot serving it, where the engine reports one."""
    state: EntryState = EntryState.RUNNING
    migrated_to: str = ""
    """The peer that took the request over (its base URL) once it answered; "" = not migrated."""
    tokens: int = 0
    """Output tokens delivered to the client (content events, where the engine streams one per event)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Fields a newer gate sends that this side does not know yet (kept, not interpreted)."""

    @property
    def final(self) -> bool:
        """The gate no longer touches this entry's output (cut, or handed to a peer)."""
        return self.state is not EntryState.RUNNING

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "endpoint": self.endpoint, "model": self.model,
                "body": base64.b64encode(self.body).decode(), "stream": self.stream,
                "started_at": self.started_at.timestamp(), "output": self.output,
                "finish_reason": self.finish_reason, "slot_id": self.slot_id, "state": self.state.value,
                "migrated_to": self.migrated_to, "tokens": self.tokens}

    @classmethod
    def from_wire(cls, doc: Any) -> JournalEntry:
        if not isinstance(doc, dict):
            raise GateError("a journal entry must be an object")
        try:
            started = _time(doc["started_at"], "started_at")
            slot = doc.get("slot_id")
            tokens = doc.get("tokens", 0)
            entry = cls(id=str(doc["id"]), endpoint=str(doc["endpoint"]), model=str(doc["model"]),
                        body=base64.b64decode(doc["body"], validate=True), stream=bool(doc["stream"]),
                        started_at=datetime.fromtimestamp(started or 0.0, UTC), output=str(doc.get("output") or ""),
                        finish_reason=str(doc["finish_reason"]) if doc.get("finish_reason") else None,
                        slot_id=slot if isinstance(slot, int) and not isinstance(slot, bool) else None,
                        state=EntryState(doc.get("state", "running")),
                        migrated_to=str(doc.get("migrated_to") or ""),
                        tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0,
                        extra={k: v for k, v in doc.items() if k not in _ENTRY_FIELDS})
        except (KeyError, TypeError, ValueError) as exc:
            raise GateError(f"the gate sent a journal entry that cannot be read: {type(exc).__name__}: {exc}") from None
        return entry


_ENTRY_FIELDS = frozenset({"id", "endpoint", "model", "body", "stream", "started_at", "output", "finish_reason",
                           "slot_id", "state", "migrated_to", "tokens"})


def entries_from_wire(answer: dict[str, Any]) -> list[JournalEntry]:
    requests = answer.get("requests")
    if not isinstance(requests, list):
        raise GateError("the gate's journal answer has no request list")
    return [JournalEntry.from_wire(doc) for doc in requests]
