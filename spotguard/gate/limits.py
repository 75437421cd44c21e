"""What one client, or all of them together, may take of the gate: time, connections, memory.

The defaults follow nginx's (the limits an operator already knows), except where an LLM API needs more:

==================  ============  ===============================================================
key ([gate])        default       nginx
==================  ============  ===============================================================
head_timeout        60 s          client_header_timeout 60s (also a new connection's first request)
body_timeout        60 s          client_body_timeout 60s (between two reads of a body)
keepalive_timeout   75 s          keepalive_timeout 75s
max_connections     1024          worker_connections (512); the oldest idle connection goes first
max_headers         100           - (Apache LimitRequestFields 100); nginx bounds them by size only
max_head            32 KiB        large_client_header_buffers 4 8k
read_ahead          64 KiB        - (nginx reads a pipelined request only after the one before)
max_body            64 MiB        client_max_body_size 1m, too small for long contexts and images
body_memory         256 MiB       - (nginx buffers bodies to disk past client_body_buffer_size)
==================  ============  ===============================================================

So the gate's memory stays under about baseline + ``body_memory`` + ``max_connections`` x (``max_head`` +
``read_ahead`` + 1 MiB of socket reads and write buffers), whatever the clients send (docs/operations.md).

Timers cost nothing per read: one periodic sweep over the connections (``ClientConnections``) checks each
connection's phase against the time it entered it; a read only sets a flag.
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter

if TYPE_CHECKING:
    from spotguard.config import GateConfig


class Limited(Protocol):
    """A client connection, as the limits act on it (``http1.ClientConnection``)."""

    def shed(self) -> None:
        """Close it to make room (it was the oldest idle one)."""

    def check_timeouts(self, now: float) -> None:
        """Close it if its phase has lasted too long."""

    def abort(self) -> None: ...

FDS_RESERVED = 64
"""File descriptors kept for everything but client connections (logs, sockets, the pool's spares)."""
MIN_SWEEP = 0.05
MAX_SWEEP = 1.0


@dataclass(frozen=True, kw_only=True)
class ClientLimits:
    head_timeout: float = 60.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 1024
    max_headers: int = 100
    max_head: int = 32 << 10
    read_ahead: int = 64 << 10
    max_body: int = 64 << 20
    body_memory: int = 256 << 20

    @classmethod
    def from_config(cls, gate: GateConfig) -> ClientLimits:
        """The ``[gate]`` keys of the same names (checked when the configuration was loaded)."""
        return cls(**{f.name: getattr(gate, f.name) for f in dataclasses.fields(cls)})

    def fitted(self, fd_limit: int) -> ClientLimits:
        """``max_connections`` within what ``fd_limit`` descriptors allow (a client connection can need a
        second one to the engine): accepting past it fails and resets real clients instead."""
        most = max(1, (fd_limit - FDS_RESERVED) // 2)
        return self if self.max_connections <= most else dataclasses.replace(self, max_connections=most)

    @property
    def sweep_interval(self) -> float:
        shortest = min(self.head_timeout, self.body_timeout, self.keepalive_timeout)
        return min(MAX_SWEEP, max(MIN_SWEEP, shortest / 4))


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft file descriptor limit to its hard limit (a shell's 1024 would cap the
    connections the gate can hold); the soft limit before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, wanted
    return soft, soft


def fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class BodyBudget:
    """Bytes of request bodies held in memory by the whole process, against ``body_memory``."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def free(self) -> int:
        return self.limit - self.used

    def give_back(self, size: int) -> None:
        self.used -= size


class ClientConnections:
    """Every open client connection, the idle ones oldest first, and the sweep that times them out."""

    def __init__(self, limits: ClientLimits, *, counter: Counter | None = None) -> None:
        self.limits = limits
        self.budget = BodyBudget(limits.body_memory)
        self.now = 0.0
        """The loop's time at the last sweep: what phases are timed from (as precise as the sweep)."""
        self._all: set[Limited] = set()
        self._idle: dict[Limited, None] = {}
        """Connections waiting for a request (new or kept alive), in the order they became idle."""
        self._counter = counter
        self._counts: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def count(self, limit: str) -> None:
        """A limit acted (a refusal, a close, a pause): counted by its ``[gate]`` key."""
        self._counts[limit] = self._counts.get(limit, 0) + 1
        if self._counter is not None:
            self._counter.labels(limit=limit).inc()

    def counts(self) -> list[tuple[str, int]]:
        return sorted(self._counts.items())

    def __len__(self) -> int:
        """Client connections open now."""
        return len(self._all)

    def add(self, connection: Limited) -> bool:
        """A new connection; False when it must be turned away (every other one is busy)."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self.now = loop.time()
            self._sweeper = loop.call_later(self.limits.sweep_interval, self._sweep)
        if len(self._all) >= self.limits.max_connections:
            self.count("max_connections")
            if not self._idle:
                return False
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.shed()
        self._all.add(connection)
        self._idle[connection] = None
        return True

    def discard(self, connection: Limited) -> None:
        self._all.discard(connection)
        self._idle.pop(connection, None)

    def idle(self, connection: Limited) -> None:
        """It waits for its next request (it goes to the back of the line of idle ones)."""
        self._idle.pop(connection, None)
        self._idle[connection] = None

    def busy(self, connection: Limited) -> None:
        self._idle.pop(connection, None)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self.now = now = loop.time()
        for connection in list(self._all):
            connection.check_timeouts(now)
        self._sweeper = loop.call_later(self.limits.sweep_interval, self._sweep) if self._all else None

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._all):
            connection.abort()
