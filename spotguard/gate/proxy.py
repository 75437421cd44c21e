"""The gate: a reverse proxy in front of the engine that journals chat/completions requests.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are journaled (see ``journal.py`` for the
life of an entry); every other request the path policy allows (``routes.py``: the inference API,
health and ``[gate] allow_paths``; anything else is 403) is passed through untouched: method, path,
query, headers (hop-by-hop ones aside), body and status, streamed both ways. Authorization headers
are forwarded and never stored or logged; bodies and outputs are user data and never logged.

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
import time
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client import Counter

from spotguard.asgi import Bound
from spotguard.config import GateConfig, parse_listen
from spotguard.errors import ConfigError, GateError
from spotguard.gate.exchange import Exchange, drop
from spotguard.gate.http1 import ClientConnection, status_line
from spotguard.gate.journal import InflightRequest, Journal
from spotguard.gate.limits import ClientConnections, ClientLimits, fd_limit
from spotguard.gate.peers import DROPPED_REASON_HEADER, FORWARDED_HEADER, Peers
from spotguard.gate.request import Request
from spotguard.gate.routes import Routes
from spotguard.gate.targets import Target
from spotguard.metrics import Metrics

JOURNALED = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""Paths whose POSTs are journaled, and their label in metrics."""

PEER_CONNECT_TIMEOUT = 2.0
"""Seconds to connect to a peer before trying the next: a dead peer must not eat the window."""
RELAY_END_MARGIN = 1.0
"""Seconds before the VM's deadline at which answers still relayed from peers are ended cleanly."""
STATS_GAPS = 100
"""Recent seam gaps sent with each stats answer (the daemon polls every second)."""
TIMEOUT_SWEEP = 1.0
"""Seconds between checks for engine answers that stopped arriving (read timeout)."""


def _error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class Gate:
    """The data plane: serve it with ``run_gate``; ``aclose()`` it when done."""

    def __init__(self, *, upstream: str, journal: Journal, metrics: Metrics, retry_after: int = 5,
                 read_timeout: float = 600.0, connect_timeout: float = 5.0, limits: ClientLimits | None = None,
                 log: structlog.stdlib.BoundLogger | None = None, allow_paths: tuple[str, ...] = (),
                 peers: tuple[str, ...] = (), instance_id: str = "", engine_kind: str = "openai") -> None:
        self._routes = Routes(allow_paths)
        self.engine = Target(upstream, connect_timeout=connect_timeout)
        self.peers = Peers(peers, connect_timeout=min(connect_timeout, PEER_CONNECT_TIMEOUT))
        self.forwarded_header = (FORWARDED_HEADER, (instance_id or socket.gethostname()).encode("latin-1", "replace"))
        self.engine_kind = engine_kind
        self._node_deadline: asyncio.TimerHandle | None = None
        self.seam_gaps: list[float] = []
        """Seconds from the local cut to the first byte of the peer's continuation, per migration (recent)."""
        self.seams = 0
        """Migrations whose continuation reached the client (``seam_gaps`` holds the last of them)."""
        self.reprefilled_tokens = 0
        """Output tokens a peer had to prefill again (what the client had before the seam)."""
        self.journal = journal
        self._metrics = metrics
        self._retry_after = str(retry_after).encode()
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._log = log if log is not None else structlog.stdlib.get_logger("spotguard.gate")
        self._draining = False
        self._past_deadline = False
        self._flights: dict[str, Exchange] = {}
        self._counters: dict[tuple[str, str], Counter] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self.exchanges: set[Exchange] = set()
        self.connections = ClientConnections(limits or ClientLimits(), counter=metrics.gate_limits)
        """Client connections, and the client-side limits they are held to (limits.py)."""
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._unsubscribe = journal.subscribe(self._on_interrupt)

    @classmethod
    def from_config(cls, config: GateConfig, *, journal: Journal, metrics: Metrics,
                    log: structlog.stdlib.BoundLogger | None = None, instance_id: str = "",
                    engine_kind: str = "openai") -> Gate:
        if not config.upstream:
            raise ConfigError("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
        return cls(upstream=config.upstream, journal=journal, metrics=metrics, retry_after=config.retry_after,
                   log=log, allow_paths=config.allow_paths, peers=config.peers, instance_id=instance_id,
                   engine_kind=engine_kind, limits=ClientLimits.from_config(config).fitted(fd_limit()))

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

    def limit_counts(self) -> list[tuple[str, int]]:
        """Times each client-side limit acted since start, by its ``[gate]`` key (mirrored by the daemon)."""
        return self.connections.counts()

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
        self.connections.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.engine.pool.close()
        self.peers.close()
        if self._node_deadline is not None:
            self._node_deadline.cancel()

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
            if self.peers and not self._past_deadline:
                exchange.migrate()
            else:
                exchange.cut("interrupted")

    # -- the one entry point of every request ----------------------------------------------------

    def handle(self, connection: ClientConnection, request: Request) -> None:
        """Called once the head of a request is in; decides what happens to it."""
        raw_path, _, query = request.target.partition(b"?")
        verdict = self._routes.check(request.method.decode("latin-1"), raw_path)
        if not verdict.allowed:  # admin endpoints and anything else outside the inference API: see routes.py
            self.count("other", "forbidden")
            request.sink = drop
            self.answer(connection, request, 403, verdict.reason, "forbidden")
            return
        if verdict.raw_path != raw_path:  # what the engine would have decoded it to, and nothing else
            request.target = verdict.raw_path + (b"?" + query if query else b"")
            request.path = verdict.path
        kind = JOURNALED.get(request.path) if request.method == b"POST" else None
        if self._draining:
            forwarded = any(name.lower() == FORWARDED_HEADER for name, _ in request.headers)
            if self.peers and not forwarded and not self._past_deadline:
                # Handed to a peer as is: the load balancer has not caught up with the drain yet.
                Exchange(self, connection, request, kind or "other").hand_off()
                return
            self.count(kind or "other", "rejected")
            request.sink = drop
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
               retry_after: bool = False, dropped: bytes = b"draining") -> None:
        """A whole JSON error answer from the gate itself (``dropped``: the Spotguard-Dropped-Reason sent with
        Retry-After, if any)."""
        body = _error_body(message, kind, status)
        close = not request.keep_alive or not request.body_done
        connection.write(b"".join((
            status_line(status), b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"retry-after: " + self._retry_after + b"\r\n" if retry_after else b"",
            DROPPED_REASON_HEADER + b": " + dropped + b"\r\n" if retry_after and dropped else b"",
            b"connection: close\r\n" if close else b"", b"\r\n", body)))
        connection.finish(request, close=close)

    def migration_stats(self) -> dict[str, Any]:
        """For the daemon's metrics: seams so far, the recent gaps (newest last), output tokens re-prefilled."""
        return {"seams": self.seams, "seam_gaps": self.seam_gaps[-STATS_GAPS:],
                "reprefilled_tokens": self.reprefilled_tokens}

    def set_node_deadline(self, at: float | None) -> None:
        """Unix time the VM goes away (None: not known). Work relayed from peers ends with a retryable
        error just before it, never with a torn connection; afterwards new requests are refused."""
        if self._node_deadline is not None:
            self._node_deadline.cancel()
            self._node_deadline = None
        if at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, at - time.time() - RELAY_END_MARGIN)
        self._node_deadline = loop.call_later(delay, self._end_relays)

    def _end_relays(self) -> None:
        self._node_deadline = None
        self._past_deadline = True
        for exchange in list(self.exchanges):
            if exchange.peer_order is not None:
                exchange.give_up("this replica is going away before the answer could finish; retry it")

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
