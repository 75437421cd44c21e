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
    set_ready: Callable[[bool, float | None], None] = field(default=lambda ready, deadline: None)
    """Readiness of the gate for new work, and the Unix time the VM goes away (None: serving again)."""
    acknowledge: Callable[[str], Awaitable[str]] | None = None
    """Approves the cloud event with this id (Azure StartRequests); None where the cloud has no such call."""
    snapshot: Snapshotter | None = None
    """The snapshot store the snapshot step saves in-flight context to; None when no store is set."""
