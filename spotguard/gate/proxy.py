"""The gate: a reverse proxy in front of the engine that journals chat/completions requests.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are journaled (see ``journal.py`` for the
life of an entry); every other request is passed through untouched: method, path, query, headers
(hop-by-hop ones aside), body and status, streamed both ways. Authorization headers are forwarded
and never stored or logged; bodies and outputs are user data and never logged.

Once ``set_draining(True)``, every NEW request gets 503 with ``Retry-After`` and a JSON error, while
requests already in flight carry on. An interrupted request (``Journal.interrupt_all``) has its
upstream connection closed, so the engine frees the slot, and its client gets a clean end: a final
SSE ``data: {"error": ...}`` event saying it was interrupted for migration, or a 503 when no answer
had started yet.

Speed matters (the gate sits on every token). The data path is plain asyncio protocols over httptools
(``http1.py``), run on uvloop by ``spotguard gate``: no task and no ASGI message per request or chunk,
only callbacks. Per chunk the gate frames and writes the bytes it got; a journaled stream also hands
them to the SSE parser (``output.py``), which parses in batches and whenever the journal is read. Every request
enters through one method, ``Gate.handle``, where a check (routes, peers) can hook in.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from urllib.parse import urlsplit

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client import Counter

from spotguard.asgi import Bound
from spotguard.config import GateConfig, parse_listen
from spotguard.errors import ConfigError, GateError
from spotguard.gate.http1 import HOP_BY_HOP, ClientConnection, Request, UpstreamConnection, status_line
from spotguard.gate.journal import InflightRequest, Journal
from spotguard.gate.output import OutputParser, request_meta
from spotguard.gate.upstream import UpstreamPool
from spotguard.metrics import Metrics

JOURNALED = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""Paths whose POSTs are journaled, and their label in metrics."""

MAX_BODY = 64 << 20
"""Largest journaled request body (long contexts, inline images); bigger ones get 413."""

TIMEOUT_SWEEP = 1.0
"""Seconds between checks for engine answers that stopped arriving (read timeout)."""

_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}
_EVENT_STREAM = b"text/event-stream"
_INTERRUPTED_EVENT = (
    b'data: {"error":{"message":"request interrupted for migration: this replica is being evicted; '
    b'retry on another replica","type":"interrupted_for_migration","code":503}}\n\n'
)
_LAST_CHUNK = b"0\r\n\r\n"


def _error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class Gate:
    """The data plane: serve it with ``run_gate``; ``aclose()`` it when done."""

    def __init__(self, *, upstream: str, journal: Journal, metrics: Metrics, retry_after: int = 5,
                 read_timeout: float = 600.0, connect_timeout: float = 5.0, max_body: int = MAX_BODY,
                 log: structlog.stdlib.BoundLogger | None = None) -> None:
        base = urlsplit(upstream)
        if base.scheme not in ("http", "https") or not base.hostname:
            raise ConfigError(
                f"[gate] upstream: expected a base URL like http://127.0.0.1:8080, got {upstream!r}")
        tls = base.scheme == "https"
        port = base.port or (443 if tls else 80)
        self._host_line = b"host: " + base.netloc.rpartition("@")[2].encode("idna") + b"\r\n"
        self._prefix = base.path.rstrip("/").encode()
        self.pool = UpstreamPool(host=base.hostname, port=port, tls=ssl.create_default_context() if tls else None,
                                 connect_timeout=connect_timeout)
        self.journal = journal
        self._metrics = metrics
        self._retry_after = str(retry_after).encode()
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._max_body = max_body
        self._log = log if log is not None else structlog.stdlib.get_logger("spotguard.gate")
        self._draining = False
        self._flights: dict[str, Exchange] = {}
        self._counters: dict[tuple[str, str], Counter] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self.exchanges: set[Exchange] = set()
        self.connections: set[ClientConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._unsubscribe = journal.subscribe(self._on_interrupt)

    @classmethod
    def from_config(cls, config: GateConfig, *, journal: Journal, metrics: Metrics,
                    log: structlog.stdlib.BoundLogger | None = None) -> Gate:
        if not config.upstream:
            raise ConfigError("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
        return cls(upstream=config.upstream, journal=journal, metrics=metrics, retry_after=config.retry_after,
                   log=log)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active(self) -> int:
        """Requests being answered right now (journaled or not)."""
        return len(self.exchanges)

    def set_draining(self, draining: bool) -> None:
        """Refuse (True) or accept again (False) new requests; requests in flight are not touched."""
        self._draining = draining

    def request_counts(self) -> list[tuple[str, str, int]]:
        """Requests answered since start, by (endpoint, result): what the daemon mirrors in its metrics."""
        return [(endpoint, result, n) for (endpoint, result), n in self._counts.items()]

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    async def aclose(self) -> None:
        """Stop listening, cut what is still running and close the connections to the engine."""
        self._unsubscribe()
        self.stop_listening()
        for exchange in list(self.exchanges):
            exchange.client.abort()
            exchange.cut("shutdown")
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pool.close()

    def count(self, endpoint: str, result: str) -> None:
        key = (endpoint, result)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self._metrics.gate_requests.labels(endpoint=endpoint, result=result)
        child.inc()
        self._counts[key] = self._counts.get(key, 0) + 1

    def _on_interrupt(self, request: InflightRequest) -> None:
        exchange = self._flights.get(request.id)
        if exchange is not None:
            exchange.cut("interrupted")

    # -- the one entry point of every request ----------------------------------------------------

    def handle(self, connection: ClientConnection, request: Request) -> None:
        """Called once the head of a request is in; decides what happens to it."""
        kind = JOURNALED.get(request.path) if request.method == b"POST" else None
        if self._draining:
            self.count(kind or "other", "rejected")
            request.sink = _drop
            self.answer(connection, request, 503, "this replica is draining before eviction; retry on another "
                        "replica", "unavailable", retry_after=True)
            return
        exchange = Exchange(self, connection, request, kind or "other")
        if kind is None:
            exchange.forward()
        else:
            exchange.read_body()

    def bad_request(self, connection: ClientConnection, status: int, message: str) -> None:
        body = _error_body(message, "invalid_request", status)
        connection.write(status_line(status) + b"content-type: application/json\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (len(body), body))

    def answer(self, connection: ClientConnection, request: Request, status: int, message: str, kind: str, *,
               retry_after: bool = False) -> None:
        """A whole JSON error answer from the gate itself."""
        body = _error_body(message, kind, status)
        close = not request.keep_alive or not request.body_done
        connection.write(b"".join((
            status_line(status), b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"retry-after: " + self._retry_after + b"\r\n" if retry_after else b"",
            b"connection: close\r\n" if close else b"", b"\r\n", body)))
        connection.finish(request, close=close)

    def upstream_head(self, request: Request, length: int | None, chunked: bool) -> bytes:
        parts = [request.method, b" ", self._prefix, request.target, b" HTTP/1.1\r\n", self._host_line]
        for name, value in request.headers:
            if name.lower() not in _NOT_FORWARDED:
                parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def track(self, exchange: Exchange) -> None:
        self.exchanges.add(exchange)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(TIMEOUT_SWEEP, self._sweep)

    def _sweep(self) -> None:
        """Fail exchanges whose engine has sent nothing for ``read_timeout`` s (one timer, not one per read)."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for exchange in list(self.exchanges):
            upstream = exchange.upstream
            if upstream is not None and now - upstream.last_read > self._read_timeout:
                exchange.upstream_failed("ReadTimeout", timeout=True)
        if self.exchanges:
            self._sweeper = asyncio.get_running_loop().call_later(TIMEOUT_SWEEP, self._sweep)


def _drop(_: bytes) -> None:
    """The body of a request answered without it."""


class Exchange:
    """One request, from the client through the engine and back."""

    __slots__ = ("gate", "client", "request", "endpoint", "entry", "parser", "upstream", "body", "started",
                 "sse", "encoded", "chunked", "close_after", "collected", "status", "headers", "reason",
                 "failed", "complete", "retried", "ended", "counted", "loop")

    def __init__(self, gate: Gate, client: ClientConnection, request: Request, endpoint: str) -> None:
        self.gate = gate
        self.client = client
        self.request = request
        self.endpoint = endpoint
        self.entry: InflightRequest | None = None
        self.parser: OutputParser | None = None
        self.upstream: UpstreamConnection | None = None
        self.body: bytes | None = None
        """The whole request body, when it is sent in one piece (journaled); then a retry is possible."""
        self.started = self.sse = self.encoded = self.chunked = self.close_after = False
        self.collected: list[bytes] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = ""
        self.failed = self.complete = self.retried = self.ended = self.counted = False
        self.loop = asyncio.get_running_loop()
        client.on_lost = self._client_lost
        client.on_pause = self._client_paused
        gate.track(self)

    # -- the request -----------------------------------------------------------------------------

    def read_body(self) -> None:
        """Journaled: the body is needed whole before anything is sent."""
        request = self.request
        if request.length is not None and request.length > self.gate._max_body:
            self._too_large()
        elif request.body_done:
            self._journal()
        else:
            request.sink = self._more_body
            request.on_done = self._journal

    def _more_body(self, chunk: bytes) -> None:
        request = self.request
        request.body.append(chunk)
        if request.body_size > self.gate._max_body and not self.ended:
            request.sink = _drop
            request.on_done = None
            self._too_large()

    def _too_large(self) -> None:
        gate = self.gate
        gate.count(self.endpoint, "too_large")
        self.counted = True
        self._end()
        gate.answer(self.client, self.request, 413, f"request body larger than {gate._max_body} bytes",
                    "invalid_request")

    def _journal(self) -> None:
        request = self.request
        body = self.body = b"".join(request.body)
        request.body.clear()
        meta = request_meta(body)
        if meta is None:
            # Not ours to judge: the engine answers it (400), it is just not worth journaling.
            self.gate.count(self.endpoint, "bad_request")
            self.counted = True
        else:
            model, stream, slot = meta
            journal = self.gate.journal
            entry = self.entry = InflightRequest(id=journal.new_id(), endpoint=request.path, model=model,
                                                 body=body, stream=stream, slot_id=slot)
            self.parser = OutputParser(entry, chat=self.endpoint == "chat")
            self.gate._flights[entry.id] = self
            journal.add(entry)
            self.gate._metrics.gate_inflight.set(len(journal))
        self._send()

    def forward(self) -> None:
        """Passed through: sent upstream at once, the body streamed as it comes."""
        self._send()

    def _send(self) -> None:
        connection = self.gate.pool.take(self.loop.time())
        if connection is not None:
            self._use(connection)
        else:
            self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            connection = await self.gate.pool.connect()
        except (OSError, TimeoutError) as exc:
            if not self.ended:
                self.upstream_failed(type(exc).__name__ if str(exc) == "" else f"{type(exc).__name__}: {exc}",
                                     timeout=isinstance(exc, TimeoutError))
            return
        if self.ended:
            self.gate.pool.give_back(connection, self.loop.time())
        else:
            self._use(connection)

    def _use(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        request = self.request
        gate = self.gate
        connection.begin(self, request.method == b"HEAD", self.loop.time())
        connection.on_pause = self.client.pause_reading
        if self.body is not None:
            connection.write(gate.upstream_head(request, len(self.body), False) + self.body)
            return
        if not request.has_body:
            connection.write(gate.upstream_head(request, None, False))
            return
        chunked = request.length is None
        pending = b"".join(request.body)
        request.body.clear()
        if chunked:
            head = gate.upstream_head(request, None, True)
            connection.write(head + (b"%x\r\n%s\r\n" % (len(pending), pending) if pending else b""))
            request.sink = lambda chunk: connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            request.on_done = lambda: connection.write(_LAST_CHUNK)
            if request.body_done:
                connection.write(_LAST_CHUNK)
        else:
            connection.write(gate.upstream_head(request, request.length, False) + pending)
            request.sink = connection.write

    def _client_paused(self, paused: bool) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading(paused)

    # -- the answer (ResponseSink) ----------------------------------------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None:
        length: bytes | None = None
        kept: list[tuple[bytes, bytes]] = []
        content_type = b""
        for name, value in headers:
            lowered = name.lower()
            if lowered in _NOT_RETURNED:
                if lowered == b"content-length":
                    length = value.strip()
                continue
            if lowered == b"content-type":
                content_type = value
            elif lowered == b"content-encoding":
                self.encoded = value.strip().lower() != b"identity"
            kept.append((name, value))
        if self.entry is not None:
            if content_type.startswith(_EVENT_STREAM):
                self.sse = True
                if self.encoded and self.parser is not None:
                    self.parser.errors += 1  # compressed: pass it on, but we cannot read the output
            else:
                # A non-streaming answer arrives all at once after generation: read it whole, so a cut
                # before it is complete can still be answered with a clean 503 instead of half a body.
                self.status, self.headers, self.collected = status, kept, []
                return
        self._head(status, kept, length)

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], length: bytes | None) -> None:
        request = self.request
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if request.method == b"HEAD" or status in (204, 304):
            if length is not None:
                parts.append(b"content-length: " + length + b"\r\n")
        elif length is not None:
            parts.append(b"content-length: " + length + b"\r\n")
        elif request.http10:
            self.close_after = True  # no framing: the end of the body is the end of the connection
        else:
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.close_after or not request.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.client.write(b"".join(parts))
        self.started = True

    def on_response_body(self, body: bytes) -> None:
        if self.collected is not None:
            self.collected.append(body)
            return
        if self.sse and not self.encoded and self.parser is not None:
            self.parser.feed(body)
        if self.chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def on_response_done(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.gate.pool.give_back(upstream, self.loop.time())
        if self.collected is not None:
            answer = b"".join(self.collected)
            if self.status == 200 and not self.encoded and self.parser is not None:
                self.parser.parse_body(answer)
            self._head(self.status, self.headers, b"%d" % len(answer))
            self.client.write(answer)
        else:
            if self.sse and self.parser is not None:
                self.parser.finish()
            if self.chunked:
                self.client.write(_LAST_CHUNK)
        self.complete = True
        self._end()

    def on_upstream_lost(self, error: str) -> None:
        upstream, self.upstream = self.upstream, None
        if (upstream is not None and upstream.reused and not upstream.received and not self.retried
                and (self.body is not None or not self.request.has_body)):
            # The engine closed a kept-alive connection just as we reused it: nothing reached it, send again.
            self.retried = True
            self._send()
            return
        self.upstream_failed(error, timeout=False)

    def upstream_failed(self, error: str, *, timeout: bool) -> None:
        """Answer 502/504 if nothing was sent yet; otherwise the client sees its answer cut short."""
        if self.ended:
            return
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        gate = self.gate
        self.failed = self.counted = True
        gate.count(self.endpoint, "upstream_error")
        gate._log.warning("gate_upstream_error", endpoint=self.endpoint, error=error, started=self.started)
        self._end()
        if self.started:
            self.client.abort()
        else:
            gate.answer(self.client, self.request, 504 if timeout else 502,
                        f"the engine behind the gate failed: {error}", "upstream_error")

    # -- ends ------------------------------------------------------------------------------------

    def _client_lost(self) -> None:
        self.cut("client_disconnect")

    def cut(self, reason: str) -> None:
        """Cut the exchange: the engine's connection is closed (it stops and frees the slot)."""
        if self.ended:
            return
        self.reason = reason
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._end()
        if reason != "interrupted":
            return
        client = self.client
        if not self.started:
            self.gate.answer(client, self.request, 503, "request interrupted for migration: this replica is being "
                             "evicted; retry on another replica", "interrupted_for_migration", retry_after=True)
        elif self.chunked:
            # Headers are out: an SSE client gets a last event saying why, then a clean end of body.
            event = _INTERRUPTED_EVENT if self.sse else b""
            client.write((b"%x\r\n%s\r\n" % (len(event), event) if event else b"") + _LAST_CHUNK)
            client.finish(self.request)
        else:
            client.close()

    def _end(self) -> None:
        """Settle the journal entry, count the result, and let the client connection move on."""
        if self.ended:
            return
        self.ended = True
        gate = self.gate
        gate.exchanges.discard(self)
        request = self.request
        if request.sink is not _drop:
            request.sink = _drop
        request.on_done = None
        entry, parser = self.entry, self.parser
        result = ""
        if parser is not None:
            parser.flush()  # the output is final now: whatever was relayed is in the entry
        if entry is not None:
            del gate._flights[entry.id]
            entry.settled.set()
            if self.reason != "interrupted":
                gate.journal.remove(entry.id)
            gate._metrics.gate_inflight.set(len(gate.journal))
        if self.reason in ("interrupted", "client_disconnect"):
            result = self.reason
        elif self.counted:
            result = ""  # counted where it happened
        elif parser is not None and parser.errors:
            result = "malformed"
        elif self.complete:
            result = "ok"
        else:
            result = "cancelled"
        if result:
            gate.count(self.endpoint, result)
        if parser is not None and parser.errors:
            gate._log.warning("gate_malformed_upstream", endpoint=self.endpoint, errors=parser.errors)
        if self.complete:
            self.client.finish(request, close=self.close_after)


def nodelay_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose accepted connections have Nagle off (Linux copies the option to them);
    without it a client that writes headers and body separately waits ~40 ms for delayed ACKs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def listen_socket(listen: str) -> socket.socket:
    """The gate's listening socket for ``[gate] listen``; a clear GateError when it cannot be had."""
    host, port = parse_listen(listen, "[gate] listen")
    try:
        return nodelay_socket(host, port)
    except OSError as exc:
        raise GateError(f"the gate cannot listen on {listen} ([gate] listen): {exc.strerror or exc}") from None


async def run_gate(gate: Gate, listen: str, sock: socket.socket | None = None, *,
                   task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``gate`` on ``sock`` (else a new socket for ``listen``) until cancelled, then close it."""
    if sock is None:
        sock = listen_socket(listen)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(lambda: ClientConnection(gate, gate.connections), sock=sock, backlog=2048)
        gate._servers.append(server)
        name = sock.getsockname()
        task_status.started(Bound(str(name[0]), int(name[1])))
        await anyio.sleep_forever()
    finally:
        await gate.aclose()
