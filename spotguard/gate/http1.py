"""HTTP/1.1 on both sides of the gate: asyncio protocols over httptools (llhttp, Node's parser).

The parsing is httptools'; what is here is the plumbing around it, kept to a few attribute writes per
callback because it runs for every request and every chunk:

- ``ClientConnection``: one accepted client connection. Parses requests, hands each to the gate's
  single entry point (``handler.handle(connection, request)``) once its head is in, and writes the
  answers back in order (pipelined requests wait their turn).
- ``UpstreamConnection``: one connection to the engine, reused while the engine keeps it alive. Sends a
  request head + body, parses the answer and reports it to its current ``ResponseSink``.

Flow control is passed through: a client that reads slowly pauses reading from the engine, an engine
that reads a large body slowly pauses reading from the client.
"""

from __future__ import annotations

import asyncio
import http
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import httptools

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
MAX_PIPELINED = 16
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 << 20
"""How long, and how much, a closing connection still reads and drops (see ``ClientConnection.close``)."""
MAX_HEAD = 64 << 10
"""Bytes a request line and headers may take (nginx allows 4 x 8 KiB): a bigger head gets 431 and the
connection closes, once one more read (at most 256 KiB) is past it (a 4 MiB header was buffered whole)."""
"""Requests queued on one client connection (pipelining) before it is closed."""

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


class Request:
    """One client request: its head, and its body as it arrives (to ``sink`` once someone takes it)."""

    __slots__ = ("method", "target", "path", "headers", "keep_alive", "http10", "chunked", "length",
                 "body", "body_done", "body_size", "sink", "on_done", "responded", "expect_continue")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool,
                 http10: bool) -> None:
        self.method = method
        self.target = target
        path = target.split(b"?", 1)[0]
        self.path = path.decode("latin-1")
        self.headers = headers
        self.keep_alive = keep_alive
        self.http10 = http10
        self.chunked = False
        self.length: int | None = None
        self.expect_continue = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                self.length = int(value) if value.strip().isdigit() else None
            elif lowered == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif lowered == b"expect":
                self.expect_continue = value.strip().lower() == b"100-continue"
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False
        self.sink: Callable[[bytes], None] | None = None
        """Takes body chunks as they arrive; until set, they pile up in ``body``."""
        self.on_done: Callable[[], None] | None = None
        """Called once the whole body is in."""
        self.responded = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


class RequestHandler(Protocol):
    def handle(self, connection: ClientConnection, request: Request) -> None: ...

    def bad_request(self, connection: ClientConnection, status: int, message: str) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One client connection: requests in, answers out, in order."""

    def __init__(self, handler: RequestHandler, connections: set[ClientConnection]) -> None:
        self._handler = handler
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._queue: deque[Request] = deque()
        self._in_head = True
        self._head_bytes = 0
        self._lingering = False
        self._lingered = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.on_lost: Callable[[], None] | None = None
        """Called when the connection goes away while an answer is owed (the exchange cuts upstream)."""
        self.on_pause: Callable[[bool], None] | None = None
        """Called with True when the client stops reading (our write buffer is full), False when it resumes."""

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._lingering:  # the answer is out: what the client still sends is read and dropped, bounded
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(403, "upgrades (websockets) are not proxied by the gate")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head:  # the whole chunk went into a head that is still not over
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(431, f"request head larger than {MAX_HEAD} bytes")
                self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._connections.discard(self)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        request = Request(parser.get_method(), self._url, self._headers, parser.should_keep_alive(),
                          parser.get_http_version() == "1.0")
        queue = self._queue
        queue.append(request)
        if len(queue) > MAX_PIPELINED:
            self.abort()
        elif len(queue) == 1:
            self._start(request)

    def on_body(self, body: bytes) -> None:
        request = self._queue[-1]
        request.body_size += len(body)
        if request.sink is not None:
            request.sink(body)
        else:
            request.body.append(body)

    def on_message_complete(self) -> None:
        request = self._queue[-1]
        request.body_done = True
        if request.on_done is not None:
            request.on_done()
        if request.responded and request is self._queue[0]:
            self._next()

    # -- answering -------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        if request.expect_continue and not request.body_done:
            self.write(_CONTINUE)
        self._handler.handle(self, request)

    def write(self, data: bytes) -> None:
        if not self.closed:
            assert self.transport is not None
            self.transport.write(data)

    def finish(self, request: Request, *, close: bool = False) -> None:
        """The answer to ``request`` (the oldest one) is complete; the next one may start."""
        request.responded = True
        self.on_lost = self.on_pause = None
        if close or not request.keep_alive:
            self.close()
        elif request.body_done:
            self._next()
        # else: the rest of the body is read (and dropped) first; on_message_complete moves on

    def _next(self) -> None:
        queue = self._queue
        queue.popleft()
        if queue and not self.closed:
            self._start(queue[0])

    def close(self) -> None:
        """Close after what was written, lingering like nginx: a client still sending a body it will never
        have read (a 413) would otherwise get a reset that can wipe the answer before it reads it."""
        transport = self.transport
        if transport is None or self.closed or self._lingering:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        """Close at once, dropping unsent data: the client sees its answer cut short."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self.closed:
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _fail(self, status: int, message: str) -> None:
        self._handler.bad_request(self, status, message)
        self.close()


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange using it."""

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None: ...

    def on_response_body(self, body: bytes) -> None: ...

    def on_response_done(self) -> None: ...

    def on_upstream_lost(self, error: str) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to the engine; serves one exchange at a time."""

    def __init__(self, on_idle_lost: Callable[[UpstreamConnection], None]) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._on_idle_lost = on_idle_lost
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.closed = False
        self.reused = False
        self.received = False
        """Any byte of the current answer arrived (a reused connection that fails before that may be retried)."""
        self.idle_since = 0.0
        self.last_read = 0.0
        self.keep_alive = True
        self.head_only = False
        self.until_close = False
        self.on_pause: Callable[[bool], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def begin(self, sink: ResponseSink, head_only: bool, now: float) -> None:
        self.sink = sink
        self.head_only = head_only
        self.received = False
        self.until_close = False
        self.keep_alive = True
        self.last_read = now

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.last_read = asyncio.get_running_loop().time()
        if self.sink is None:
            self.abort()  # the engine spoke out of turn: this connection cannot be trusted for reuse
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(f"malformed answer from the engine: {exc}")
            self.abort()

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.keep_alive = parser.should_keep_alive()
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._headers)
        status = parser.get_status_code()
        self.until_close = not framed and status not in (204, 304) and not self.head_only
        sink = self.sink
        if sink is not None:
            sink.on_response_head(status, self._headers, self)
        if self.head_only and self.sink is not None:
            # llhttp cannot be told the answer is to a HEAD; end it here and do not reuse the connection.
            self.keep_alive = False
            self._done()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if not self.head_only:
            self._done()

    def _done(self) -> None:
        sink, self.sink = self.sink, None
        self.on_pause = None
        if sink is not None:
            sink.on_response_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.sink is None:
            self._on_idle_lost(self)
        elif self.until_close:
            self._done()  # an answer without framing ends when the engine closes
        else:
            self._lost(f"the engine closed the connection{f' ({type(exc).__name__})' if exc else ''}")

    def _lost(self, error: str) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_upstream_lost(error)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    def write(self, data: bytes) -> None:
        if not self.closed:
            assert self.transport is not None
            self.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self.closed:
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def abort(self) -> None:
        """Close at once: mid-answer this is how the engine learns to stop (and free its slot)."""
        self.sink = None
        if self.transport is not None and not self.closed:
            self.transport.abort()
