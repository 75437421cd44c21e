"""One request sent to one target (the engine, or a peer) and its answer coming back.

The shared half of ``exchange.LocalExchange`` (to the engine) and ``relay.PeerRelay`` (to peers): take a
kept-alive connection or open one (in a task the gate tracks and cancels on close), write the request
head and body, and be the ``ResponseSink`` its answer is reported to. What to do with the answer is the
subclass's.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from spotguard.gate.answer import LAST_CHUNK, ClientAnswer
from spotguard.gate.request import HOP_BY_HOP, Request
from spotguard.gate.targets import Target
from spotguard.gate.upstream import UpstreamConnection

if TYPE_CHECKING:
    from spotguard.gate.context import GateContext


_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}
EVENT_STREAM = b"text/event-stream"


def drop(_: bytes) -> None:
    """The body of a request answered without it."""


class ReturnedHead:
    """An answer's head as the gate passes it on: hop-by-hop headers out, the length and type read."""

    __slots__ = ("headers", "length", "sse", "encoded")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: bytes | None = None
        self.sse = False
        self.encoded = False
        """Compressed: passed on, but the gate cannot read what it says."""
        for name, value in headers:
            lowered = name.lower()
            if lowered in _NOT_RETURNED:
                if lowered == b"content-length":
                    self.length = value.strip()
                continue
            if lowered == b"content-type":
                self.sse = value.startswith(EVENT_STREAM)
            elif lowered == b"content-encoding":
                self.encoded = value.strip().lower() != b"identity"
            self.headers.append((name, value))


class Leg(ABC):
    """Sends ``request`` (or ``body`` in its place) to ``target``; subclasses handle the answer."""

    __slots__ = ("gate", "answer", "request", "endpoint", "target", "upstream", "body", "retried", "loop",
                 "extra_headers")

    def __init__(self, gate: GateContext, answer: ClientAnswer, endpoint: str, target: Target) -> None:
        self.gate = gate
        self.answer = answer
        self.request: Request = answer.request
        self.endpoint = endpoint
        self.target = target
        self.upstream: UpstreamConnection | None = None
        self.body: bytes | None = None
        """The whole request body, when it is sent in one piece; then sending it again is possible."""
        self.retried = False
        self.loop = asyncio.get_running_loop()
        self.extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    # -- sending ---------------------------------------------------------------------------------

    def send(self) -> None:
        connection = self.target.pool.take(self.loop.time())
        if connection is not None:
            self._use(connection)
        else:
            self.gate.spawn(self._connect(), "connect")

    async def _connect(self) -> None:
        target = self.target
        try:
            connection = await target.pool.connect()
        except (OSError, TimeoutError) as exc:
            if not self.finished:
                self.connect_failed(exc)
            return
        if self.finished or target is not self.target:
            target.pool.give_back(connection, self.loop.time())
        else:
            self._use(connection)

    def _use(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        request = self.request
        connection.begin(self, request.method == b"HEAD", self.loop.time())
        connection.on_pause = self.answer.client.pause_reading
        target, extra = self.target, self.extra_headers
        # The request's last bytes go through finish_request: only a connection whose request was written
        # whole (and whose answer was read whole) is kept alive for the next one.
        if self.body is not None:
            connection.finish_request(target.head(request, len(self.body), False, extra) + self.body)
            return
        if not request.has_body:
            connection.finish_request(target.head(request, None, False, extra))
            return
        pending = b"".join(request.body)
        request.body.clear()
        if request.length is None:  # chunked from the client: chunked to the target, as it comes
            connection.write(target.head(request, None, True, extra)
                             + (b"%x\r\n%s\r\n" % (len(pending), pending) if pending else b""))
            request.sink = lambda chunk: connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            request.on_done = lambda: connection.finish_request(LAST_CHUNK)
            if request.body_done:
                connection.finish_request(LAST_CHUNK)
        else:
            connection.write(target.head(request, request.length, False, extra) + pending)
            request.sink = connection.write
            request.on_done = connection.finish_request
            if request.body_done:
                connection.finish_request()

    def can_resend(self, upstream: UpstreamConnection | None) -> bool:
        """A kept-alive connection closed by the target just as we reused it: nothing reached it, send again."""
        return (upstream is not None and upstream.reused and not upstream.received and not self.retried
                and (self.body is not None or not self.request.has_body))

    def release_upstream(self) -> None:
        """The answer is complete: the connection goes back to the target's pool (if it may be reused)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.target.pool.give_back(upstream, self.loop.time())

    def close_upstream(self) -> None:
        """Close the target's connection now: mid-answer this is how the engine learns to stop."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()

    def paused(self, paused: bool) -> None:
        """The client stopped (True) or resumed (False) reading: so does the upstream read."""
        if self.upstream is not None:
            self.upstream.pause_reading(paused)

    def stop_body(self) -> None:
        """Whatever is left of the request body is read and dropped."""
        request = self.request
        request.sink = drop
        request.on_done = request.on_refused = None

    # -- what subclasses decide (the ResponseSink callbacks among them) ----------------------------

    @property
    @abstractmethod
    def finished(self) -> bool:
        """The leg has ended: a connection that arrives now goes back to the pool unused."""

    @abstractmethod
    def connect_failed(self, exc: OSError | TimeoutError) -> None: ...

    @abstractmethod
    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]],
                         upstream: UpstreamConnection) -> None: ...

    @abstractmethod
    def on_response_body(self, body: bytes) -> None: ...

    @abstractmethod
    def on_response_done(self) -> None: ...

    @abstractmethod
    def on_upstream_lost(self, error: str) -> None: ...

    @abstractmethod
    def read_timed_out(self) -> None:
        """The target sent nothing for ``[gate]`` read timeout seconds (the gate's sweep found it)."""
