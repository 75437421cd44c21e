"""One snapshot in progress: where it goes, what it has stored so far, and how it stores one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

from spotguard.errors import StoreError
from spotguard.metrics import Metrics
from spotguard.storage import crypto
from spotguard.storage.format import EngineState, Entry, Missing
from spotguard.storage.store import Store
from spotguard.storage.upload import put_file, seal_and_put


def report_problem(errors: list[str], reason: str, message: str, *, metrics: Metrics,
                   log: structlog.stdlib.BoundLogger) -> None:
    """Record a snapshot's problem in ``errors``, log and count it: the snapshot then says it is incomplete, and
    why. Messages name objects and endpoints, never user data."""
    errors.append(message)
    metrics.config_errors.labels(component="snapshot", reason=reason).inc()
    log.warning("snapshot.problem", reason=reason, error=message)


@dataclass
class Progress:
    """What one snapshot has written so far (local to one save)."""

    entries: list[Entry] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    """Objects planned and not yet stored: name -> what it is (for the manifest's missing list)."""
    engine: EngineState | None = None


@dataclass(frozen=True, kw_only=True)
class Job:
    store: Store
    key: crypto.Key | None
    prefix: str
    """``<instance>/<event>`` under the store's URL, both made safe as path segments."""
    instance: str
    """The instance id as written in the manifest: encrypted objects are bound to it and the event id."""
    event_id: str
    metrics: Metrics
    log: structlog.stdlib.BoundLogger
    progress: Progress = field(default_factory=Progress)

    def problem(self, reason: str, message: str) -> None:
        """Record, log and count a problem (``report_problem``)."""
        report_problem(self.progress.errors, reason, message, metrics=self.metrics, log=self.log)

    async def store_object(self, name: str, kind: str, plain: bytes | Path, **extra: object) -> None:
        """Store ``plain`` (bytes, or a file streamed from disk) as ``name`` and list it for the manifest."""
        path = f"{self.prefix}/{name}"
        bound = crypto.binding(self.instance, self.event_id, name)
        try:
            if isinstance(plain, Path):
                size, digest = await put_file(self.store, self.key, path, bound, plain)
            else:
                size, digest = await seal_and_put(self.store, self.key, path, bound, plain)
        except StoreError:
            self.metrics.snapshot_objects.labels(kind=kind, result="failed").inc()
            raise
        self.metrics.snapshot_objects.labels(kind=kind, result="ok").inc()
        self.metrics.snapshot_bytes.labels(kind=kind).inc(size)
        self.progress.pending.pop(name, None)
        self.progress.entries.append(Entry(name=name, kind=kind, size=size, sha256=digest,
                                           encrypted=self.key is not None, **extra))  # type: ignore[arg-type]
