"""Connections from the gate to the engine (or a peer): one connection, and the pool that keeps them alive.

``UpstreamConnection`` is an asyncio protocol over httptools: it sends a request head + body, parses the
answer (interim 1xx answers skipped) and reports it to its current ``ResponseSink``.

The most recently used idle connection is taken first (its TCP state and the engine's buffers are
warm). Idle ones are dropped after ``keepalive`` seconds, before the engine's own keep-alive timeout
(5 s in llama.cpp and uvicorn), so a connection is not closed under a request we are sending on it;
when that still happens the exchange retries once on a new connection (``UpstreamConnection.reused``).
A connection whose request was not written whole, or whose answer was not read whole, is never kept
(``UpstreamConnection.reusable``): nginx does not keep engine connections alive at all by default.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import httptools

KEEPALIVE = 4.0
"""Seconds an idle connection to the engine is kept."""
MAX_IDLE = 256
"""Idle connections kept at most; more are closed when released."""


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange using it."""

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None: ...

    def on_response_body(self, body: bytes) -> None: ...

    def on_response_done(self) -> None: ...

    def on_upstream_lost(self, error: str) -> None: ...


_LET_GO = httptools.HttpResponseParser(object())
"""What a lost connection's parser is swapped for (``connection_lost``)."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to the engine; serves one exchange at a time.

    It may only carry the next request once this one is over on both sides (``reusable``): the whole
    request written (``finish_request``) and the whole answer read. An engine that answers before it read
    the body (uvicorn, vLLM with ``--api-key`` answering 401) would otherwise read the next request on
    this connection as the rest of that body, and its client would wait for an answer that never comes.
    """

    def __init__(self, on_idle_lost: Callable[[UpstreamConnection], None]) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._on_idle_lost = on_idle_lost
        self._interim = False
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.closed = False
        self.reused = False
        self.received = False
        """Any byte of the current answer arrived (a reused connection that fails before that may be retried)."""
        self.request_sent = True
        self.response_done = True
        self.idle_since = 0.0
        self.last_read = 0.0
        """Event-loop time of the last read, as the gate's sweep saw it (within its period)."""
        self.read_seen = False
        """Something was read since the sweep last looked: a flag, because reading the clock on every chunk
        showed in the gate's profile."""
        self.keep_alive = True
        self.head_only = False
        self.until_close = False
        self.on_pause: Callable[[bool], None] | None = None

    @property
    def reusable(self) -> bool:
        """Nothing of the last exchange is left on the wire, and the engine keeps the connection open."""
        return (not self.closed and self.keep_alive and self.sink is None and self.request_sent
                and self.response_done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def begin(self, sink: ResponseSink, head_only: bool, now: float) -> None:
        self.sink = sink
        self.head_only = head_only
        self.received = False
        self.until_close = False
        self.keep_alive = True
        self.request_sent = self.response_done = self._interim = False
        self.last_read = now

    def data_received(self, data: bytes) -> None:
        self.received = self.read_seen = True
        if self.sink is None:
            self.abort()  # the engine spoke out of turn: this connection cannot be trusted for reuse
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._lost(f"malformed answer from the engine: {exc}")
            self.abort()

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._lost("the engine switched protocols (101): the gate does not proxy upgrades")
                self.abort()
                return
            self._interim = True  # 100 Continue, 103 Early Hints: the answer is still to come
            return
        self.keep_alive = parser.should_keep_alive()
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._headers)
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
        if self._interim:
            self._interim = False
        elif not self.head_only:
            self._done()

    def _done(self) -> None:
        sink, self.sink = self.sink, None
        self.on_pause = None
        self.response_done = True
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
        # Its parser's callbacks are this connection's methods: let go of it, or the two are a reference cycle
        # left to the cyclic garbage collector for every connection that closes.
        self._parser = _LET_GO
        self.on_pause = None

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

    def finish_request(self, data: bytes = b"") -> None:
        """Write the last bytes of the request (the whole of it, or the end of its body)."""
        self.write(data)
        self.request_sent = True

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


class UpstreamPool:
    def __init__(self, *, host: str, port: int, tls: ssl.SSLContext | None, connect_timeout: float,
                 keepalive: float = KEEPALIVE) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._idle: list[UpstreamConnection] = []
        self._sweep: asyncio.TimerHandle | None = None

    def take(self, now: float) -> UpstreamConnection | None:
        """A live idle connection, or None (then ``connect``)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive:
                connection.reused = True
                return connection
            connection.abort()
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(self._forget), self._host, self._port, ssl=self._tls,
                                   server_hostname=self._host if self._tls is not None else None),
            self._connect_timeout)
        return connection

    def give_back(self, connection: UpstreamConnection, now: float) -> None:
        """Keep ``connection`` for the next request, if nothing of the last one is left on it; else close it."""
        if not connection.reusable:
            connection.abort()
            return
        connection.idle_since = now
        self._idle.append(connection)
        if len(self._idle) > MAX_IDLE:
            self._idle.pop(0).abort()
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._expire)

    def _forget(self, connection: UpstreamConnection) -> None:
        """An idle connection closed by the engine."""
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def _expire(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        keep: list[UpstreamConnection] = []
        for connection in self._idle:
            if not connection.closed and now - connection.idle_since < self._keepalive:
                keep.append(connection)
            else:
                connection.abort()
        self._idle = keep
        if keep:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive / 2, self._expire)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in self._idle:
            connection.abort()
        self._idle = []
