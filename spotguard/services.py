"""The long-lived collaborators a drain acts on, built once by the daemon from the configuration."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spotguard.clouds.identity import Identity

if TYPE_CHECKING:
    from spotguard.gate.journal import JournalAccess
    from spotguard.lb.base import LoadBalancer
    from spotguard.servers.base import EngineAdapter
    from spotguard.storage.snapshot import Snapshotter


@dataclass(frozen=True, kw_only=True)
class Services:
    identity: Identity
    engine: EngineAdapter
    balancers: tuple[LoadBalancer, ...] = ()
    journal: JournalAccess | None = None
    """The gate's journal (in the gate process, reached through ``gate.link``); None when no gate is set."""
    refuse_new_work: Callable[[bool], None] = field(default=lambda refuse: None)
    """Whether the gate refuses new requests (the readiness step: True; an undrain's reopen_gate: False).
    The daemon declares it to the gate together with the node's deadline (``agent/deadline.py``)."""
    acknowledge: Callable[[str], Awaitable[str]] | None = None
    """Approves the cloud event with this id (Azure StartRequests); None where the cloud has no such call."""
    snapshot: Snapshotter | None = None
    """The snapshot store the snapshot step saves in-flight context to; None when no store is set."""
