"""HTTP/1.1 on the clients' side of the gate: an asyncio protocol over httptools (llhttp, Node's parser).

The parsing is httptools'; what is here is the plumbing around it, kept to a few attribute writes per
callback because it runs for every request and every chunk:

- ``ClientConnection``: one accepted client connection. Parses requests, refuses what is not plain
  HTTP/1.1 (or 1.0) as the gate accepts it (a head over its limits, another version, no Host or two,
  a transfer coding other than chunked, a GET/HEAD with a body), hands each request to the gate's
  single entry point (``handler.handle(connection, request)``) once its head is in, and writes the
  answers back in order (pipelined requests wait their turn, and reading pauses once ``read_ahead``
  bytes of them are in). It holds the client's side of the limits in ``limits.py``: the timeouts (checked
  by the sweep, ``check_timeouts``), and the bodies held in memory (``max_body``, ``body_memory``).

Flow control is passed through: a client that reads slowly pauses reading from the engine, an engine
that reads a large body slowly pauses reading from the client. The engine's side (``UpstreamConnection``)
is in upstream.py, the request itself in request.py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from spotguard.gate.limits import ClientConnections
from spotguard.gate.request import VERSIONS, Request

MAX_PIPELINED = 16
"""Requests queued on one client connection (pipelining) before it is closed."""
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 << 20
"""How long, and how much, a closing connection still reads and drops (see ``ClientConnection.close``)."""
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUSY_BODY = b'{"error":{"message":"the gate holds its maximum of connections; retry","type":"unavailable","code":503}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
_PAUSED_UPSTREAM = 1
"""Reading paused because the engine reads the body slower than the client sends it."""
_PAUSED_AHEAD = 2
"""Reading paused because ``read_ahead`` bytes of pipelined requests are waiting."""


def _discard(_: bytes) -> None:
    """The rest of a body that will not be used."""


_LET_GO = httptools.HttpRequestParser(object())
"""What a lost connection's parser is swapped for: its own holds the connection's methods as callbacks, a
reference cycle that would leave every closed connection to the cyclic garbage collector."""


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a connection that has been refused or is closing."""


class RequestHandler(Protocol):
    def handle(self, connection: ClientConnection, request: Request) -> None: ...

    def bad_request(self, connection: ClientConnection, status: int, message: str) -> None: ...

    def internal_error(self, error: BaseException) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One client connection: requests in, answers out, in order."""

    def __init__(self, handler: RequestHandler, connections: ClientConnections) -> None:
        self._handler = handler
        self._connections = connections
        self._limits = limits = connections.limits
        self._max_head = limits.max_head
        self._max_headers = limits.max_headers
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._queue: deque[Request] = deque()
        self._in_head = False
        self._in_body = False
        self._head_parsed = 0
        """Bytes of the current head the parser handed over (the line and whole headers)."""
        self._head_raw = 0
        """Bytes of reads that fell wholly inside the current head (a header still arriving)."""
        self._completed = 0
        self._ahead = 0
        self._paused = 0
        self._lingering = False
        self._lingered = 0
        self._written = False
        """Bytes of an answer to the oldest request were written."""
        self.since = 0.0
        """When the current phase began (idle, head) or the body last moved: what the sweep times."""
        self.read_seen = False
        self.served = False
        """A request was answered: idle now means kept alive (``keepalive_timeout``, not ``head_timeout``)."""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.on_lost: Callable[[], None] | None = None
        """Called when the connection goes away while an answer is owed (the exchange cuts upstream)."""
        self.on_pause: Callable[[bool], None] | None = None
        """Called with True when the client stops reading (our write buffer is full), False when it resumes."""

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if not self._connections.add(self):
            self.closed = True
            self.transport.write(_BUSY)
            self.transport.close()
            return
        self.since = self._connections.now

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._lingering:  # the answer is out: what the client still sends is read and dropped, bounded
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        self.read_seen = True
        completed = self._completed
        try:
            self._parser.feed_data(data)
        except _Stop:
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__  # what a callback raised (httptools sets it)
            if isinstance(cause, _Stop) or self._lingering or self.closed:
                return
            if cause is not None:
                self._internal(cause)
                return
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        except httptools.HttpParserUpgrade:
            self._fail(403, "upgrades (websockets) are not proxied by the gate")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and completed == self._completed:
            # No request ended in this read, so all of it belongs to the head still arriving (a header
            # value in pieces is only handed over whole: count the reads, or it would grow unseen).
            self._head_raw += len(data)
            if self._head_raw > self._max_head:
                self._fail(431, f"request head larger than {self._max_head} bytes ([gate] max_head)", "max_head")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._connections.discard(self)
        for request in self._queue:
            self._release(request)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()
        # Nothing more comes from this connection: let go of what refers back to it (no cycles left to the GC).
        self.on_pause = None
        self._parser = _LET_GO
        for request in self._queue:
            request.sink = request.on_done = request.on_refused = None

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._lingering or self.closed:
            raise _Stop  # refused or answered with close: nothing after it is read
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_parsed = self._head_raw = 0
        self.since = self._connections.now
        if not self._queue:
            self._connections.busy(self)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_parsed += len(url)
        if len(self._url) > self._max_head:
            self._fail(414, f"request target longer than {self._max_head} bytes ([gate] max_head)", "max_head")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        self._head_parsed += len(name) + len(value) + 4
        if len(headers) > self._max_headers:
            self._fail(431, f"more than {self._max_headers} headers ([gate] max_headers)", "max_headers")
            raise _Stop
        if self._head_parsed > self._max_head:
            self._fail(431, f"request head larger than {self._max_head} bytes ([gate] max_head)", "max_head")
            raise _Stop

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        if version not in VERSIONS:
            self._fail(505, f"HTTP/{version} is not supported: the gate speaks HTTP/1.1 and 1.0")
            raise _Stop
        if parser.should_upgrade():
            self._fail(403, "upgrades (websockets) are not proxied by the gate")
            raise _Stop
        request = Request(parser.get_method(), self._url, self._headers, parser.should_keep_alive(),
                          version == "1.0")
        if request.invalid is not None:
            self._fail(*request.invalid)
            raise _Stop
        self._in_body = request.has_body
        self.since = self._connections.now
        queue = self._queue
        queue.append(request)
        if len(queue) > MAX_PIPELINED:
            self.abort()
        elif len(queue) == 1:
            self._start(request)

    def on_body(self, body: bytes) -> None:
        queue = self._queue
        request = queue[-1]
        size = len(body)
        request.body_size += size
        sink = request.sink
        if sink is not None:
            sink(body)
            return
        request.body.append(body)
        request.buffered += size
        if request is not queue[0]:  # pipelined behind the one being served: read ahead, up to a point
            request.ahead += size
            self._ahead += size
            if self._ahead > self._limits.read_ahead and not self._paused & _PAUSED_AHEAD:
                self._connections.count("read_ahead")
                self._pause(_PAUSED_AHEAD, True)
        elif not self._hold(request, size):
            raise _Stop

    def on_message_complete(self) -> None:
        self._completed += 1
        self._in_body = False
        request = self._queue[-1]
        request.body_done = True
        if request.on_done is not None:
            request.on_done()
        queue = self._queue
        if request.responded and queue and request is queue[0]:
            self._next()

    # -- the limits ------------------------------------------------------------------------------

    def _hold(self, request: Request, size: int) -> bool:
        """``size`` more bytes of the served request's body are held in memory: within the limits?"""
        limits = self._limits
        if request.collecting and request.body_size > limits.max_body:
            self._refuse(request, 413, f"request body larger than {limits.max_body} bytes ([gate] max_body)",
                         "max_body")
            return False
        if not self._connections.budget.take(size):
            self._refuse(request, 503, "the gate holds as many request bodies as it may ([gate] body_memory); "
                         "retry shortly", "body_memory")
            return False
        request.charged += size
        return True

    def _check_declared(self, request: Request) -> bool:
        """A body wanted whole whose Content-Length cannot fit is refused before it is read."""
        limits = self._limits
        length = request.length
        if length is None or not request.collecting:
            return True
        if length > limits.max_body:
            self._refuse(request, 413, f"request body larger than {limits.max_body} bytes ([gate] max_body)",
                         "max_body")
            return False
        if length - request.buffered > self._connections.budget.free():
            self._refuse(request, 503, "the gate holds as many request bodies as it may ([gate] body_memory); "
                         "retry shortly", "body_memory")
            return False
        return True

    def _release(self, request: Request) -> None:
        if request.charged:
            self._connections.budget.give_back(request.charged)
            request.charged = 0

    def _refuse(self, request: Request, status: int, message: str, limit: str) -> None:
        """A limit stops ``request``: whoever serves it answers (or the connection does), then it closes."""
        self._connections.count(limit)
        request.sink = _discard
        request.on_done = None
        callback, request.on_refused = request.on_refused, None
        if callback is not None and not request.responded:
            callback(status, message, limit)
        elif not request.responded:
            request.responded = True
            self._handler.bad_request(self, status, message)
        self.close()

    def _pause(self, reason: int, paused: bool) -> None:
        before = self._paused
        self._paused = after = before | reason if paused else before & ~reason
        transport = self.transport
        if transport is None or self.closed or bool(before) == bool(after):
            return
        if after:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        """Called by the sweep: close a connection that has waited too long in its phase."""
        if self.closed or self._lingering:
            return
        if self._paused or self.read_seen and self._in_body:
            self.read_seen = False
            self.since = now  # waiting on the engine or our own read-ahead limit is not the client's doing
            return
        self.read_seen = False
        limits, queue = self._limits, self._queue
        if self._in_head:
            if not queue and now - self.since > limits.head_timeout:
                self._fail(408, f"the request head did not arrive within {limits.head_timeout:g}s "
                           "([gate] head_timeout)", "head_timeout")
        elif self._in_body:
            if len(queue) == 1 and now - self.since > limits.body_timeout:
                self._refuse(queue[0], 408, f"the request body stalled for {limits.body_timeout:g}s "
                             "([gate] body_timeout)", "body_timeout")
        elif not queue:
            timeout, limit = ((limits.keepalive_timeout, "keepalive_timeout") if self.served
                              else (limits.head_timeout, "head_timeout"))
            if now - self.since > timeout:
                self._connections.count(limit)
                self.shed()

    def shed(self) -> None:
        """Close an idle connection (no request on it) at once, the way nginx drops idle keep-alives."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # -- answering -------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._written = False
        if request.ahead:
            self._ahead -= request.ahead
            request.ahead = 0
            if self._paused & _PAUSED_AHEAD and self._ahead <= self._limits.read_ahead:
                self._pause(_PAUSED_AHEAD, False)
        self._handler.handle(self, request)
        if request.responded or request.body_done and not request.buffered:
            return
        if request.sink is None:  # what came already is held now (wanted whole, or until the engine is reached)
            if not self._check_declared(request) or not self._hold(request, request.buffered):
                return
        if request.expect_continue and not request.body_done:
            self.write(_CONTINUE)

    def write(self, data: bytes) -> None:
        if not self.closed and not self._lingering:
            assert self.transport is not None
            self._written = True
            self.transport.write(data)

    def finish(self, request: Request, *, close: bool = False) -> None:
        """The answer to ``request`` (the oldest one) is complete; the next one may start."""
        request.responded = True
        self._release(request)
        request.on_done = request.on_refused = None  # answered: whatever served it is not called again
        self.on_lost = self.on_pause = None
        self._pause(_PAUSED_UPSTREAM, False)
        if close or not request.keep_alive:
            self.close()
        elif request.body_done:
            self._next()
        # else: the rest of the body is read (and dropped) first; on_message_complete moves on

    def _next(self) -> None:
        queue = self._queue
        queue.popleft()
        self.served = True
        if self.closed or self._lingering:
            return
        if queue:
            self._start(queue[0])
        elif not self._in_head:
            self.since = self._connections.now
            self._connections.idle(self)

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
        self._connections.busy(self)
        if self._paused:
            self._paused = 0
            transport.resume_reading()  # read (and drop) what the client still sends
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        """Close at once, dropping unsent data: the client sees its answer cut short."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def pause_reading(self, paused: bool) -> None:
        """The engine's side is full (True) or drained (False): stop or resume reading the client."""
        self._pause(_PAUSED_UPSTREAM, paused)

    def _internal(self, error: BaseException) -> None:
        """The gate's own handling of a request failed (not the client's fault): logged; a 500 where no answer
        is owed on the connection yet, else the connection is dropped (the client sees a retryable failure)."""
        self._handler.internal_error(error)
        queue = self._queue
        if len(queue) > 1 or queue and self._written:  # a 500 cannot go in the middle of an answer
            self.abort()
            return
        if queue:
            queue[0].responded = True  # whatever took it on writes nothing more: the connection closes
        self._handler.bad_request(self, 500, "the gate failed to handle this request; retry it")
        self.close()

    def _fail(self, status: int, message: str, limit: str = "invalid_http") -> None:
        """Refuse what was read of the next request (counted under ``limit``) and close."""
        queue = self._queue
        if len(queue) == 1 and self._in_body:  # the body of the request being served: its server answers
            self._refuse(queue[0], status, message, limit)
            return
        self._connections.count(limit)
        if queue:  # an answer is owed on this connection: a refusal cannot go in the middle of it
            self.abort()
            return
        self._handler.bad_request(self, status, message)
        self.close()
