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

Speed matters (the gate sits on every token): pooled httpx clients (sharded, see ``Gate.__init__``),
raw byte pass-through, an incremental SSE parser, and no work per chunk beyond finding line ends and
one ``json.loads`` per event. Clients of other paths that disconnect mid-answer are noticed only when
the engine's answer ends (uvicorn drops writes to a closed connection silently).
"""

from __future__ import annotations

import http.cookiejar
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
import structlog
from anyio.abc import TaskStatus
from prometheus_client import Counter

from spotguard.asgi import Bound, Receive, Scope, Send, read_body, serve, tcp_socket
from spotguard.config import GateConfig, parse_listen
from spotguard.errors import ConfigError
from spotguard.gate.journal import InflightRequest, Journal
from spotguard.gate.output import OutputParser, request_meta
from spotguard.gate.routes import Routes
from spotguard.metrics import Metrics

JOURNALED = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""Paths whose POSTs are journaled, and their label in metrics."""

MAX_BODY = 64 << 20
"""Largest journaled request body (long contexts, inline images); bigger ones get 413."""

POOL_SHARDS = 32
"""Upstream connection pools; see ``Gate.__init__``."""

URL_CACHE = 1024
"""Upstream URLs kept parsed, by path and query (cleared when full: query strings may be unique)."""

CLOSE_TIMEOUT = 2.0
"""Seconds allowed to close an upstream response or finish a client answer after a cut."""

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
_NOT_FORWARDED = _HOP_BY_HOP | {b"host"}  # httpx sets Host to the upstream's
_EVENT_STREAM = b"text/event-stream"
_INTERRUPTED_EVENT = (
    b'data: {"error":{"message":"request interrupted for migration: this replica is being evicted; '
    b'retry on another replica","type":"interrupted_for_migration","code":503}}\n\n'
)


def _error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


@dataclass(eq=False)
class _Flight:
    """The gate's handle on one journaled request: cancelling ``scope`` cuts its upstream exchange."""

    scope: anyio.CancelScope
    reason: str = ""
    done: bool = False

    def cut(self, reason: str) -> None:
        if not self.done and not self.reason:
            self.reason = reason
            self.scope.cancel()


class Gate:
    """The ASGI app. Build one per daemon; ``aclose()`` it when done."""

    def __init__(self, *, upstream: str, journal: Journal, metrics: Metrics, retry_after: int = 5,
                 read_timeout: float = 600.0, connect_timeout: float = 5.0, max_body: int = MAX_BODY,
                 log: structlog.stdlib.BoundLogger | None = None, allow_paths: tuple[str, ...] = ()) -> None:
        self._routes = Routes(allow_paths)
        base = httpx.URL(upstream)
        if base.scheme not in ("http", "https") or not base.host:
            raise ConfigError(
                f"[gate] upstream: expected a base URL like http://127.0.0.1:8080, got {upstream!r}")
        self._scheme = base.scheme
        self._host = base.host
        self._port = base.port
        self._prefix = base.raw_path.split(b"?", 1)[0].rstrip(b"/")
        self.journal = journal
        self._metrics = metrics
        self._retry_after = str(retry_after).encode()
        self._max_body = max_body
        self._log = log if log is not None else structlog.stdlib.get_logger("spotguard.gate")
        self._draining = False
        self._flights: dict[str, _Flight] = {}
        self._counters: dict[tuple[str, str], Counter] = {}
        self._urls: dict[bytes, httpx.URL] = {}
        # Upstream cookies must never leak from one client to the next: the jar refuses them all.
        no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        tls = ssl.create_default_context()
        # httpcore's pool checks every idle connection (a poll() each) on every request and release, so
        # one pool of hundreds of connections costs more than the proxying itself: shard it, and keep a
        # client connection on one shard so its upstream connection is reused.
        self._clients = [httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0,
                                  pool=connect_timeout),
            # Idle upstream connections are dropped before the engine's own keep-alive timeout (5 s in
            # llama.cpp and uvicorn), so a reused one is not closed under our feet.
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128, keepalive_expiry=4.0),
            cookies=no_cookies, follow_redirects=False, trust_env=False, verify=tls,
        ) for _ in range(POOL_SHARDS)]
        self._unsubscribe = journal.subscribe(self._on_interrupt)

    @classmethod
    def from_config(cls, config: GateConfig, *, journal: Journal, metrics: Metrics,
                    log: structlog.stdlib.BoundLogger | None = None) -> Gate:
        if not config.upstream:
            raise ConfigError("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
        return cls(upstream=config.upstream, journal=journal, metrics=metrics, retry_after=config.retry_after,
                   log=log, allow_paths=config.allow_paths)

    @property
    def draining(self) -> bool:
        return self._draining

    def set_draining(self, draining: bool) -> None:
        """Refuse (True) or accept again (False) new requests; requests in flight are not touched."""
        self._draining = draining

    async def aclose(self) -> None:
        self._unsubscribe()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            for client in self._clients:
                await client.aclose()

    def _on_interrupt(self, request: InflightRequest) -> None:
        flight = self._flights.get(request.id)
        if flight is not None:
            flight.cut("interrupted")

    def _count(self, endpoint: str, result: str) -> None:
        child = self._counters.get((endpoint, result))
        if child is None:
            child = self._counters[(endpoint, result)] = self._metrics.gate_requests.labels(
                endpoint=endpoint, result=result)
        child.inc()

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not proxied (uvicorn answers 403)
        verdict = self._routes.check(scope["method"], scope.get("raw_path") or scope["path"].encode())
        if not verdict.allowed:  # admin endpoints and anything else outside the inference API: see routes.py
            self._count("other", "forbidden")
            await self._answer(send, 403, verdict.reason, "forbidden")
            return
        if verdict.raw_path != scope.get("raw_path"):
            scope = {**scope, "path": verdict.path, "raw_path": verdict.raw_path}
        kind = JOURNALED.get(scope["path"]) if scope["method"] == "POST" else None
        if self._draining:
            self._count(kind or "other", "rejected")
            await self._answer(send, 503, "this replica is draining before eviction; retry on another "
                               "replica", "unavailable", retry_after=True)
        elif kind is None:
            await self._passthrough(scope, receive, send)
        else:
            await self._journaled(scope, receive, send, kind)

    def _request(self, scope: Scope, content: bytes | AsyncIterator[bytes] | None) -> httpx.Request:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        target = raw_path + b"?" + query if query else raw_path
        url = self._urls.get(target)
        if url is None:
            # Parsing a URL costs more than the rest of the request set-up; the same few paths recur.
            url = httpx.URL(scheme=self._scheme, host=self._host, port=self._port,
                            raw_path=self._prefix + target)
            if len(self._urls) >= URL_CACHE:
                self._urls.clear()
            self._urls[target] = url
        headers = [(k, v) for k, v in scope["headers"] if k not in _NOT_FORWARDED]
        return httpx.Request(scope["method"], url, headers=headers, content=content)

    async def _send(self, scope: Scope, content: bytes | AsyncIterator[bytes] | None) -> httpx.Response:
        client = self._clients[hash(scope.get("client")) % POOL_SHARDS]
        return await client.send(self._request(scope, content), stream=True)

    @staticmethod
    def _response_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]

    async def _answer(self, send: Send, status: int, message: str, kind: str, *,
                      retry_after: bool = False) -> None:
        body = _error_body(message, kind, status)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after:
            headers.append((b"retry-after", self._retry_after))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _upstream_failed(self, send: Send, endpoint: str, exc: httpx.HTTPError, started: bool) -> None:
        """Answer 502/504 if nothing was sent yet; otherwise the client sees its answer cut short."""
        self._count(endpoint, "upstream_error")
        self._log.warning("gate_upstream_error", endpoint=endpoint, error=type(exc).__name__, started=started)
        if not started:
            timeout = isinstance(exc, httpx.TimeoutException)
            await self._answer(send, 504 if timeout else 502,
                               f"the engine behind the gate failed: {type(exc).__name__}", "upstream_error")

    # -- everything else: untouched --------------------------------------------------------------

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        if await self._relay(scope, send, _request_body(receive) if has_body else None, "other"):
            self._count("other", "ok")

    async def _relay(self, scope: Scope, send: Send, content: bytes | AsyncIterator[bytes] | None,
                     kind: str) -> bool:
        """Send the request upstream and stream its answer back as is; False when the upstream failed."""
        started = False
        response: httpx.Response | None = None
        try:
            response = await self._send(scope, content)
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": self._response_headers(response)})
            started = True
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return True
        except httpx.HTTPError as exc:
            await self._upstream_failed(send, kind, exc, started)
            return False
        finally:
            if response is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await response.aclose()

    # -- chat / completions: journaled -----------------------------------------------------------

    async def _journaled(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        try:
            body = await read_body(receive, self._max_body)
        except ValueError:
            self._count(kind, "too_large")
            await self._answer(send, 413, f"request body larger than {self._max_body} bytes",
                               "invalid_request")
            return
        meta = request_meta(body)
        if meta is None:
            # Not ours to judge: the engine answers it (400), it is just not worth journaling.
            self._count(kind, "bad_request")
            await self._passthrough_buffered(scope, send, body)
            return
        model, stream, slot = meta
        entry = InflightRequest(id=self.journal.new_id(), endpoint=scope["path"], model=model, body=body,
                                stream=stream, slot_id=slot)
        flight = _Flight(anyio.CancelScope())
        self._flights[entry.id] = flight
        self.journal.add(entry)
        self._metrics.gate_inflight.set(len(self.journal))
        parser = OutputParser(entry, chat=kind == "chat")
        state = _Exchange()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_client, receive, flight)
                with flight.scope:
                    await self._exchange(scope, send, entry, parser, flight, state)
                flight.done = True
                tg.cancel_scope.cancel()
        finally:
            flight.done = True
            del self._flights[entry.id]
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                if state.response is not None:
                    # Mid-stream this closes the connection: the engine stops and frees the slot.
                    await state.response.aclose()
                if flight.reason == "interrupted" and flight.scope.cancelled_caught and not state.complete:
                    await self._end_interrupted(send, state.started, state.sse)
            entry.settled.set()
            self._settle(entry, kind, flight, state, parser)

    async def _exchange(self, scope: Scope, send: Send, entry: InflightRequest, parser: OutputParser,
                        flight: _Flight, state: _Exchange) -> None:
        try:
            response = state.response = await self._send(scope, entry.body)
            headers = self._response_headers(response)
            content_type = response.headers.get("content-type", "")
            encoded = response.headers.get("content-encoding", "identity") != "identity"
            if content_type.encode().startswith(_EVENT_STREAM):
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": headers})
                state.started = state.sse = True
                if encoded:
                    parser.errors += 1  # compressed: pass it on, but we cannot read the output
                    async for chunk in response.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                else:
                    feed = parser.feed
                    # Fallback for an event set directly rather than through Journal.interrupt().
                    interrupted = entry.interrupted.is_set
                    async for chunk in response.aiter_raw():
                        feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if interrupted():
                            flight.cut("interrupted")
                    parser.finish()
                await send({"type": "http.response.body", "body": b""})
            else:
                # A non-streaming answer arrives all at once after generation: read it whole, so a cut
                # before it is complete can still be answered with a clean 503 instead of half a body.
                chunks = [chunk async for chunk in response.aiter_raw()]
                answer = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if response.status_code == 200 and not encoded:
                    parser.parse_body(answer)
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": headers})
                state.started = True
                await send({"type": "http.response.body", "body": answer})
            state.complete = True
        except httpx.HTTPError as exc:
            state.failed = True
            await self._upstream_failed(send, JOURNALED[scope["path"]], exc, state.started)

    async def _end_interrupted(self, send: Send, started: bool, sse: bool) -> None:
        try:
            if started:
                # Headers are out: an SSE client gets a last event saying why, then a clean end of body.
                await send({"type": "http.response.body", "body": _INTERRUPTED_EVENT if sse else b"",
                            "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                await self._answer(send, 503, "request interrupted for migration: this replica is being "
                                   "evicted; retry on another replica", "interrupted_for_migration",
                                   retry_after=True)
        except (OSError, RuntimeError) as exc:
            # The cut raced the end of the answer or the client's departure: nothing left to tell.
            self._log.info("gate_interrupt_notice_not_sent", error=type(exc).__name__)

    def _settle(self, entry: InflightRequest, kind: str, flight: _Flight, state: _Exchange,
                parser: OutputParser) -> None:
        cut = flight.scope.cancelled_caught
        if cut and flight.reason == "interrupted":
            result = "interrupted"  # the entry stays for the snapshot step, which removes it
        else:
            self.journal.remove(entry.id)
            if cut and flight.reason == "client_disconnect":
                result = "client_disconnect"
            elif state.failed:
                result = ""  # counted where it failed
            elif parser.errors:
                result = "malformed"
            elif state.complete:
                result = "ok"
            else:
                result = "cancelled"
        if result:
            self._count(kind, result)
        if parser.errors:
            self._log.warning("gate_malformed_upstream", endpoint=kind, errors=parser.errors)
        self._metrics.gate_inflight.set(len(self.journal))

    async def _passthrough_buffered(self, scope: Scope, send: Send, body: bytes) -> None:
        await self._relay(scope, send, body, JOURNALED[scope["path"]])


@dataclass(eq=False)
class _Exchange:
    response: httpx.Response | None = None
    started: bool = False
    sse: bool = False
    complete: bool = False
    failed: bool = False


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    """The client's request body as it arrives, for pass-through without buffering."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _watch_client(receive: Receive, flight: _Flight) -> None:
    """Cut the exchange when the client goes away (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flight.cut("client_disconnect")
            return


def nodelay_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose accepted connections have Nagle off.

    asyncio sets TCP_NODELAY only on sockets created with proto IPPROTO_TCP, which ``tcp_socket``'s are
    not; without it a client that writes headers and body separately waits ~40 ms for delayed ACKs.
    Linux copies the option from the listener to every accepted socket.
    """
    sock = tcp_socket(host, port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def run_gate(gate: Gate, listen: str, *,
                   task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``gate`` on ``listen`` (host:port) until cancelled, then close its upstream pool."""
    host, port = parse_listen(listen, "[gate] listen")
    try:
        await serve(gate, nodelay_socket(host, port), task_status=task_status)
    finally:
        await gate.aclose()
