"""One request through the gate: the client's side, the engine's, and the journal entry between them.

``Gate.handle`` (proxy.py) makes one per request it lets through. The exchange reads the body when it is
journaled, sends the request on a kept-alive engine connection, relays the answer (feeding a journaled
stream's bytes to the output parser), and settles everything once, in ``_end``: the journal entry,
the result counted in metrics, and the client connection's turn to the next request.

With ``[gate] peers`` an exchange can also be served by peers: handed over whole while the gate drains
(``hand_off``), or continued there when the drain cuts it (``migrate``): the client gets one answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from spotguard.gate.continuation import NotContinuable, continuation_body
from spotguard.gate.http1 import HOP_BY_HOP, ClientConnection, status_line
from spotguard.gate.journal import InflightRequest
from spotguard.gate.output import OutputParser, request_meta
from spotguard.gate.peers import SKIP_STATUSES
from spotguard.gate.request import Request
from spotguard.gate.stitch import AnswerIdentity, StreamStitch
from spotguard.gate.targets import Target
from spotguard.gate.upstream import UpstreamConnection

if TYPE_CHECKING:
    from spotguard.gate.proxy import Gate

_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}
_EVENT_STREAM = b"text/event-stream"
_INTERRUPTED_EVENT = (
    b'data: {"error":{"message":"request interrupted for migration: this replica is being evicted; '
    b'retry on another replica","type":"interrupted_for_migration","code":503}}\n\n'
)
LAST_CHUNK = b"0\r\n\r\n"


def drop(_: bytes) -> None:
    """The body of a request answered without it."""


SEAM_SAMPLES = 1000
"""Seam gaps kept by the gate (the newest) for the daemon's metrics."""


class Exchange:
    """One request, from the client through the engine and back."""

    __slots__ = ("gate", "client", "request", "endpoint", "entry", "parser", "upstream", "body", "started",
                 "sse", "encoded", "chunked", "close_after", "collected", "status", "headers", "reason",
                 "failed", "complete", "retried", "ended", "counted", "loop", "target", "peer", "peer_order",
                 "skipping", "migrating", "stitch", "held", "cut_at", "migrated")

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
        self.target: Target = gate.engine
        self.peer: Target | None = None
        self.peer_order: Iterator[Target] | None = None
        """Set once the request is served by peers (handed off while draining, or migrated)."""
        self.skipping = self.migrating = False
        self.stitch: StreamStitch | None = None
        self.held = b""
        """The start of an SSE event not sent to the client yet: only whole events go out, so a migration
        can join the peer's events without a torn one at the seam."""
        self.cut_at = 0.0
        self.migrated: InflightRequest | None = None
        """The journal entry of a migrated request (kept for the snapshot step)."""
        client.on_lost = self._client_lost
        client.on_pause = self._client_paused
        request.on_refused = self.refused
        gate.track(self)

    # -- the request -----------------------------------------------------------------------------

    def read_body(self) -> None:
        """Journaled: the body is needed whole before anything is sent (the connection holds it in
        ``request.body``, within ``[gate] max_body`` and ``body_memory``: see ``refused``)."""
        request = self.request
        if request.body_done:
            self._journal()
        else:
            request.on_done = self._journal

    def refused(self, status: int, message: str, limit: str) -> None:
        """A client-side limit stopped this request's body (http1): answer it if nothing was sent yet."""
        if self.ended:
            return
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        gate = self.gate
        gate.count(self.endpoint, limit)
        self.counted = True
        self._end()
        if self.started:
            self.client.abort()
        else:
            gate.answer(self.client, self.request, status, message,
                        "unavailable" if status == 503 else "invalid_request", retry_after=status == 503,
                        dropped=b"")

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
        connection = self.target.pool.take(self.loop.time())
        if connection is not None:
            self._use(connection)
        else:
            self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        target = self.target
        try:
            connection = await target.pool.connect()
        except (OSError, TimeoutError) as exc:
            if not self.ended and self.peer_order is not None:
                self.gate.peers.failed(target)
                self._next_peer()
            elif not self.ended:
                self.upstream_failed(type(exc).__name__ if str(exc) == "" else f"{type(exc).__name__}: {exc}",
                                     timeout=isinstance(exc, TimeoutError))
            return
        if self.ended:
            target.pool.give_back(connection, self.loop.time())
        else:
            self._use(connection)

    def _use(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        request = self.request
        gate = self.gate
        connection.begin(self, request.method == b"HEAD", self.loop.time())
        connection.on_pause = self.client.pause_reading
        target = self.target
        extra = (gate.forwarded_header,) if self.peer_order is not None else ()
        if self.body is not None:
            connection.finish_request(target.head(request, len(self.body), False, extra) + self.body)
            return
        if not request.has_body:
            connection.finish_request(target.head(request, None, False, extra))
            return
        chunked = request.length is None
        pending = b"".join(request.body)
        request.body.clear()
        if chunked:
            head = target.head(request, None, True)
            connection.write(head + (b"%x\r\n%s\r\n" % (len(pending), pending) if pending else b""))
            request.sink = lambda chunk: connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            request.on_done = lambda: connection.finish_request(LAST_CHUNK)
            if request.body_done:
                connection.finish_request(LAST_CHUNK)
        else:
            connection.write(target.head(request, request.length, False) + pending)
            request.sink = connection.write
            request.on_done = connection.finish_request
            if request.body_done:
                connection.finish_request()

    def _client_paused(self, paused: bool) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading(paused)

    # -- the answer (ResponseSink) ----------------------------------------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None:
        if self.peer_order is not None and self._peer_answered(status):
            return
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
        if self.skipping:
            return
        if self.stitch is not None:
            self._stitched(self.stitch.feed(body))
            return
        if self.collected is not None:
            self.collected.append(body)
            return
        if self.sse and not self.encoded and self.parser is not None:
            self.parser.feed(body)
            if self.gate.peers:  # only whole events, so a migration can join the peer's (else: no per-chunk scan)
                body = self._whole_events(body)
                if not body:
                    return
        self._write(body)

    def _write(self, body: bytes) -> None:
        if self.chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def _whole_events(self, body: bytes) -> bytes:
        """What of ``body`` ends a whole SSE event (the rest waits in ``held``)."""
        data = self.held + body if self.held else body
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:
            self.held = data
            return b""
        self.held = data[end:]
        return data[:end]

    def on_response_done(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.target.pool.give_back(upstream, self.loop.time())
        if self.skipping:  # a peer that refused (503, 429): the next one
            self.skipping = False
            self._next_peer()
            return
        if self.stitch is not None:
            self._stitched(self.stitch.finish())
            if self.chunked:
                self.client.write(LAST_CHUNK)
            self.complete = True
            self._end()
            return
        if self.held:
            self._write(self.held)
            self.held = b""
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
                self.client.write(LAST_CHUNK)
        self.complete = True
        self._end()

    def on_upstream_lost(self, error: str) -> None:
        if self.peer_order is not None and not self.ended:
            upstream, self.upstream = self.upstream, None
            if upstream is not None and upstream.received and not self.skipping:
                self.give_up(f"the replica continuing this answer failed ({error}); retry it")
            else:  # nothing of this peer's answer came: the next peer (a stale kept-alive one is not its fault)
                if self.peer is not None and not (upstream is not None and upstream.reused):
                    self.gate.peers.failed(self.peer)
                self.skipping = False
                self._next_peer()
            return
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
        if reason == "interrupted":
            self._tell_interrupted("request interrupted for migration: this replica is being evicted; retry on "
                                   "another replica")

    def _tell_interrupted(self, message: str, event: bytes = _INTERRUPTED_EVENT) -> None:
        client = self.client
        if not self.started:
            self.gate.answer(client, self.request, 503, message, "interrupted_for_migration", retry_after=True)
        elif self.chunked:
            # Headers are out: an SSE client gets a last event saying why, then a clean end of body.
            event = event if self.sse else b""
            client.write((b"%x\r\n%s\r\n" % (len(event), event) if event else b"") + LAST_CHUNK)
            client.finish(self.request)
        else:
            client.close()

    # -- peers: hand-off while draining, migration of what is in flight ------------------------------

    def hand_off(self) -> None:
        """A new request while draining: read it whole (a refusing peer means sending it again), then send it
        to the peers in turn, unchanged but for the loop-guard header."""
        self.peer_order = self.gate.peers.order()
        request = self.request
        if not request.has_body or request.body_done:
            self._take_body_then_peer()
        else:
            request.on_done = self._take_body_then_peer

    def _take_body_then_peer(self) -> None:
        request = self.request
        if request.has_body:
            self.body = b"".join(request.body)
            request.body.clear()
        self._next_peer()

    def migrate(self) -> None:
        """Cut the local exchange and continue it on a peer, into the same client answer."""
        entry, parser = self.entry, self.parser
        if self.ended or self.migrating or entry is None or parser is None:
            return
        parser.flush()  # the output so far, as far as the client has it (whole events only)
        try:
            original = json.loads(entry.body)
            if not isinstance(original, dict):
                raise NotContinuable("the request body is not a JSON object")
            body = continuation_body(original, chat=self.endpoint == "chat", output=entry.output_text,
                                     delivered=parser.content_events, engine=self.gate.engine_kind,
                                     tool_call_started=parser.tool_call_started)
        except (NotContinuable, ValueError) as exc:
            self.gate.count(self.endpoint, "not_continuable")
            self.gate._log.info("gate_not_continuable", endpoint=self.endpoint, why=str(exc))
            self.cut("interrupted")
            return
        if self.upstream is not None:
            self.upstream.abort()  # the engine stops and frees the slot
            self.upstream = None
        # The local part is final: the snapshot step reads the entry (and releases it); the exchange goes on.
        self.gate._flights.pop(entry.id, None)
        entry.settled.set()
        self.entry = None
        self.migrated = entry
        self.parser = None
        self.migrating = True
        self.cut_at = self.loop.time()
        self.gate.reprefilled_tokens += parser.content_events
        self.held = b""  # an event the client never got: the peer's continuation covers it
        if self.started and self.sse:
            self.stitch = StreamStitch(parser.identity or AnswerIdentity(), chat=self.endpoint == "chat",
                                       role_sent=parser.role_sent, delivered=parser.content_events)
        elif self.started:  # a non-SSE answer already begun cannot be joined
            self.give_up("the answer cannot be continued elsewhere; retry it")
            return
        self.collected = None
        self.status = 0
        self.body = json.dumps(body, ensure_ascii=False).encode()
        self.peer_order = self.gate.peers.order()
        self._next_peer()

    def _next_peer(self) -> None:
        if self.ended:
            return
        assert self.peer_order is not None
        peer = next(self.peer_order, None)
        if peer is None:
            if self.migrated is not None:
                self.migrated.migrated_to = ""  # no peer took it: resume it from the snapshot
            if self.migrating and self.started:
                self.give_up("no other replica could take this answer over; retry it")
            else:
                self.gate.count(self.endpoint, "no_peer")
                self.counted = True
                self._end()
                self.gate.answer(self.client, self.request, 503, "this replica is draining before eviction and no "
                                 "other replica took the request; retry it", "unavailable", retry_after=True)
            return
        self.target = self.peer = peer
        if self.migrated is not None:
            self.migrated.migrated_to = peer.url  # the snapshot's record says where it went
        self._send()

    def _peer_answered(self, status: int) -> bool:
        """A peer's answer began: True when it is handled here (refused: next peer; or joined by the stitch)."""
        assert self.peer is not None
        if status in SKIP_STATUSES:
            self.gate.peers.failed(self.peer)
            self.skipping = True
            return True
        self.gate.peers.worked(self.peer)
        if self.stitch is None:
            return False  # relayed as is: the client has seen nothing of this request yet
        if status != 200:
            self.give_up(f"the replica continuing this answer refused it ({status}); retry it")
        return True

    def _stitched(self, data: bytes) -> None:
        if not data:
            return
        if self.cut_at:
            gaps = self.gate.seam_gaps
            gaps.append(self.loop.time() - self.cut_at)
            del gaps[:-SEAM_SAMPLES]
            self.gate.seams += 1
            self.cut_at = 0.0
        self._write(data)

    def give_up(self, message: str) -> None:
        """End a peer-served answer cleanly: a retryable error event (or 503), never a torn connection."""
        if self.ended:
            return
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self.gate.count(self.endpoint, "migration_failed" if self.migrating else "forward_failed")
        self.counted = True
        self.reason = "gave_up"
        self._end()
        event = (b'data: {"error":{"message":' + json.dumps(message).encode()
                 + b',"type":"interrupted_for_migration","code":503}}\n\n')
        self._tell_interrupted(message, event)

    def _end(self) -> None:
        """Settle the journal entry, count the result, and let the client connection move on."""
        if self.ended:
            return
        self.ended = True
        gate = self.gate
        gate.exchanges.discard(self)
        request = self.request
        if request.sink is not drop:
            request.sink = drop
        request.on_done = request.on_refused = None
        entry, parser = self.entry, self.parser
        if parser is not None:
            parser.flush()  # the output is final now: whatever was relayed is in the entry
        result = ""
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
        elif self.migrating:
            result = "migrated" if self.complete else "migration_failed"
        elif self.peer_order is not None:
            result = "forwarded" if self.complete else "forward_failed"
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
