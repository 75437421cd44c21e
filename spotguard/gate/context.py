"""What the legs of a request (``exchange``, ``relay``, ``resume``, ``holder``) use of the gate.

``proxy.Gate`` is the one implementation; the legs see it through this protocol, so none of them imports
the module that builds them (no cycle between the gate's modules).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    import structlog

    from spotguard.gate.answer import ClientAnswer
    from spotguard.gate.held import Origin
    from spotguard.gate.holding import Holding
    from spotguard.gate.http1 import ClientConnection
    from spotguard.gate.peers import Peers
    from spotguard.gate.registry import Registry
    from spotguard.gate.request import Request
    from spotguard.gate.stitch import AnswerIdentity
    from spotguard.gate.targets import Target
    from spotguard.gate.upstream import UpstreamConnection


class Tracked(Protocol):
    """A request's leg, as the gate keeps track of it (read time-outs, closing)."""

    upstream: UpstreamConnection | None
    answer: ClientAnswer

    def read_timed_out(self) -> None: ...

    def close_upstream(self) -> None: ...


class GateContext(Protocol):
    """The gate as a request's legs see it."""

    engine: Target
    """The engine behind the gate."""
    peers: Peers
    registry: Registry
    holding: Holding | None
    """Resume (``[resume]``); None when it is off."""
    log: structlog.stdlib.BoundLogger
    retry_after: bytes
    engine_kind: str
    forwarded_header: tuple[bytes, bytes]
    seam_gaps: list[float]
    seams: int
    reprefilled_tokens: int

    @property
    def draining(self) -> bool: ...

    @property
    def assembles(self) -> bool: ...

    def count(self, endpoint: str, result: str) -> None: ...

    def track(self, leg: Tracked) -> None: ...

    def untrack(self, leg: Tracked) -> None: ...

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...

    def dispatch(self, connection: ClientConnection, request: Request, endpoint: str) -> None: ...

    def index_cut(self, *, answer_id: str, holder: str, fingerprint: str, origin: Origin, output: str, tokens: int,
                  delivered: int, identity: AnswerIdentity | None, role_sent: bool, prefix: str = "") -> None: ...
