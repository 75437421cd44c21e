"""A request served by peers (``[gate] peers``), its answer relayed to the client through this gate.

Three ways in:

- ``PeerRelay.hand_off``: a new request while the gate drains (the load balancer has not caught up): read
  whole, then sent to the peers in turn, unchanged but for the loop-guard header;
- a retry of an answer this draining gate does not hold (``resume.Resumption._hand_off``): handed on the
  same way, with its cursor, so a peer finds the answer where it is;
- a continuation (``LocalExchange._migrate``): the request plus the output so far, whose answer is joined
  onto the one the client already has (``stitch.StreamStitch``), into the same client response.

A peer that refuses to connect or answers 503/429 is passed over for the next; one that fails once its
answer began ends the client's answer with a retryable error, as does the VM's deadline
(``Gate``'s node deadline): never a torn connection.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from spotguard.errors import ResumeRefused
from spotguard.gate.answer import ClientAnswer
from spotguard.gate.assemble import answer_json, streamable, streaming_body
from spotguard.gate.handover import CONTINUES_HEADER, Continues
from spotguard.gate.held import Origin
from spotguard.gate.holding import HOLDER_HEADER, RESUMED_HEADER, header
from spotguard.gate.http1 import ClientConnection
from spotguard.gate.leg import Leg, ReturnedHead
from spotguard.gate.output import OutputParser
from spotguard.gate.peers import DROPPED_REASON_HEADER, SKIP_STATUSES
from spotguard.gate.registry import Flight
from spotguard.gate.request import Request
from spotguard.gate.stitch import AnswerIdentity, StreamStitch
from spotguard.gate.targets import Target
from spotguard.gate.upstream import UpstreamConnection

if TYPE_CHECKING:
    from collections.abc import Iterator

    from spotguard.gate.context import GateContext

SEAM_SAMPLES = 1000
"""Seam gaps kept by the gate (the newest) for the daemon's metrics."""
SAME_PEER_TRIES = 4
"""Times a peer that answered "draining" is tried again before it is passed over: a peer that is the fleet's
load balancer may route a request back to this very node until its health checks notice the drain."""
NO_PEER = "no other replica could take this answer over; retry it"
BROKEN_CONTINUATION = "the replica continuing this answer sent a malformed event; retry it"


class PeerRelay(Leg):
    """One request on its way through the peers."""

    __slots__ = ("flight", "stitch", "order", "peer", "skipping", "again", "tries", "cut_at", "ended", "assemble",
                 "parser", "prefix", "verbatim", "held_by", "fingerprint", "origin", "resumes")

    def __init__(self, gate: GateContext, answer: ClientAnswer, endpoint: str, *, flight: Flight | None = None,
                 stitch: StreamStitch | None = None, assemble: bool = False, prefix: str = "") -> None:
        self.order: Iterator[Target] = gate.peers.order()
        super().__init__(gate, answer, endpoint, gate.engine)
        self.flight = flight
        """The local part of a migrated request (its record names the peer that took it)."""
        self.stitch = stitch
        self.peer: Target | None = None
        self.skipping = False
        """The current peer refused (503, 429): its answer is read and dropped, then the next one."""
        self.again = False
        """The current peer answered "draining": it is tried once more (see ``SAME_PEER_TRIES``)."""
        self.tries = 0
        self.assemble = assemble
        """The client asked for one JSON answer: the peer's stream is read whole, then joined to the local part."""
        self.parser = OutputParser(chat=endpoint == "chat") if stitch is not None else None
        """What the peer added, as the client has it (stitched): a second cut, or the index, needs it."""
        self.prefix = prefix
        """The text the client had before the local part (this gate itself continued the answer)."""
        self.verbatim = False
        """The peer holds the answer: its events come joined and with its cursors, and are relayed as they are."""
        stamp = answer.stamp
        self.held_by = (gate.holding.holder, stamp.answer_id) if stamp is not None and gate.holding else None
        """(holder, answer id) of the answer the client is reading: this gate's, until a peer takes it over."""
        self.fingerprint = stamp.answer.fingerprint if stamp is not None else ""
        self.origin: Origin | None = stamp.answer.origin if stamp is not None else None
        """The request as the client sent it (what the index keeps for continuing it elsewhere)."""
        self.resumes = False
        self.cut_at = self.loop.time() if flight is not None else 0.0
        self.ended = False
        self.extra_headers = (gate.forwarded_header,)
        client = answer.client
        client.on_lost = self._client_lost
        client.on_pause = self.paused
        gate.track(self)

    @classmethod
    def hand_off(cls, gate: GateContext, client: ClientConnection, request: Request, endpoint: str, *,
                 resumes: bool = False) -> PeerRelay:
        """A new request while draining: read it whole (a refusing peer means sending it again), then to peers.
        ``resumes``: a retry that a peer resolves (its answer comes back as it is)."""
        relay = cls(gate, ClientAnswer(client, request, retry_after=gate.retry_after), endpoint)
        relay.resumes = resumes
        request.on_refused = relay.refused
        if not request.has_body or request.body_done:
            relay._body_in()
        else:
            request.on_done = relay._body_in  # the client connection holds the body (``[gate] max_body``)
        return relay

    @property
    def finished(self) -> bool:
        return self.ended

    @property
    def migrating(self) -> bool:
        return self.flight is not None

    def refused(self, status: int, message: str, limit: str) -> None:
        """A client-side limit stopped the request's body before it went anywhere."""
        if self.ended:
            return
        self._end(limit)
        self.answer.refused(status, message)

    def _body_in(self) -> None:
        request = self.request
        if request.has_body:
            self.body = b"".join(request.body)
            request.body.clear()
        if self.gate.holding is not None and self.endpoint in ("chat", "completions") and self.body and not self.resumes:
            self._resumable()
        self.next_peer()

    def _resumable(self) -> None:
        """A new request handed over with resume on: sent as an answer nothing of which was delivered yet, so a
        gate of the fleet that takes it holds it under this request's fingerprint, and a non-streaming one is
        asked for as a stream (its holder known at once, its output so far known: resumable like the rest)."""
        holding, body = self.gate.holding, self.body
        assert holding is not None and body is not None
        try:
            original = json.loads(body)
        except ValueError:
            return
        if not isinstance(original, dict):
            return
        chat = self.endpoint == "chat"
        stream = original.get("stream") is True
        self.fingerprint = holding.fingerprint(self.request.headers, body)
        model = original.get("model")
        self.origin = Origin(endpoint=self.request.path, model=model if isinstance(model, str) else "", body=body,
                             stream=stream)
        if not stream and streamable(original):
            self.body = json.dumps(streaming_body(original), ensure_ascii=False).encode()
            self.assemble = True
        self.parser = OutputParser(chat=chat)
        handover = Continues(fingerprint=self.fingerprint, base=0, tokens=0, prefix_chars=0, stream=stream, chat=chat,
                             identity=AnswerIdentity(), role_sent=False)
        self.extra_headers += ((CONTINUES_HEADER, handover.to_header(holding.key)),)

    def next_peer(self) -> None:
        if self.ended:
            return
        peer = next(self.order, None)
        flight = self.flight
        if peer is None:
            if flight is not None:
                flight.migrated_to = ""  # no peer took it: resume it from the snapshot
            if self.migrating and self.answer.started:
                self.give_up(NO_PEER)
            else:
                self._end("no_peer")
                self.answer.error(503, "this replica is draining before eviction and no other replica took the "
                                  "request; retry it", "unavailable", draining=True)
            return
        self.target = self.peer = peer
        self.tries = 0
        if flight is not None:
            flight.migrated_to = peer.url  # the snapshot's record says where it went
        self.send()

    def connect_failed(self, exc: OSError | TimeoutError) -> None:
        self.gate.peers.failed(self.target)
        self.next_peer()

    # -- the peer's answer (ResponseSink) ----------------------------------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None:
        peer = self.peer
        assert peer is not None
        if status in SKIP_STATUSES:
            self.skipping = True
            if status == 503 and self.tries + 1 < SAME_PEER_TRIES and _draining(headers):
                self.again = True  # a balancer sent it back here: the next try goes elsewhere
            else:
                self.gate.peers.failed(peer)
            return
        self.gate.peers.worked(peer)
        holder = header(headers, HOLDER_HEADER) if header(headers, RESUMED_HEADER) is not None else None
        if self.stitch is None:  # the client has seen nothing of this request yet
            if status == 200 and holder is not None:
                self._holder_took_over(holder.decode("ascii", "replace"))
            if status == 200 and self.assemble:
                return  # read whole, answered as one JSON at the end
            self.assemble = False
            returned = ReturnedHead(headers)
            # "Resumed" is for a client's own retry; on a first answer it would only confuse a resuming client.
            kept = returned.headers if self.resumes else [(n, v) for n, v in returned.headers
                                                          if n.lower() != RESUMED_HEADER]
            self.answer.sse = returned.sse and not returned.encoded  # a stream cut later ends with an error event, not a clean end
            self.answer.head(status, kept, returned.length)
        elif status != 200:
            self.give_up(f"the replica continuing this answer refused it ({status}); retry it")
        elif holder is not None:
            self._holder_took_over(holder.decode("ascii", "replace"))

    def _holder_took_over(self, token: str) -> None:
        """The peer is a gate of the fleet and holds the answer now: its events come joined and with its own
        cursors, so they are relayed as they are; a retry of this answer is sent there."""
        self.stitch = None
        self.verbatim = True
        answer, holding = self.answer, self.gate.holding
        stamp = answer.stamp
        if stamp is not None and holding is not None:
            holding.moved_to(stamp.answer_id, token, stamp.offset)
            answer.last_id = stamp.last()
            answer.stamp = None
            stamp.finish(self.loop.time(), complete=False)
        if holding is not None and self.fingerprint:
            try:
                there = holding.key.verify(f"{token}.0", fingerprint=self.fingerprint, now=time.time())
            except ResumeRefused:
                there = None
            if there is not None:
                self.held_by = (there.holder, there.answer_id)
                self.index()  # a kill -9 of this node from now on loses nothing: the fleet knows where it went
        answer.track_ids = answer.whole_events = True  # whole events: the last id seen is a whole one

    def on_response_body(self, body: bytes) -> None:
        if self.skipping:
            return
        if self.stitch is not None:
            joined = self.stitch.feed(body)
            if self.stitch.broken:
                self.give_up(BROKEN_CONTINUATION)
                return
            self._stitched(joined)
        elif self.verbatim or self.assemble:
            self._stitched(body)
        else:
            self.answer.send(body)

    def on_response_done(self) -> None:
        self.release_upstream()
        if self.skipping:
            self.skipping = False
            if self.again:
                self.again = False
                self.tries += 1
                self.send()
            else:
                self.next_peer()
            return
        if self.stitch is not None:
            self._stitched(self.stitch.finish())
            if self.stitch.broken:
                self.give_up(BROKEN_CONTINUATION)
                return
        if self.assemble:
            self._assembled()
            return
        self._end("migrated" if self.migrating else "forwarded")
        self.answer.complete()

    def _assembled(self) -> None:
        """One JSON answer: the local part (if any) and the peer's continuation."""
        parser = self.parser
        assert parser is not None
        parser.finish()
        local = self._local_part()
        whole = answer_json(chat=self.endpoint == "chat", identity=local.identity or parser.identity,
                            text=self.prefix + local.text + parser.text, finish_reason=parser.finish_reason,
                            usage=parser.usage, fingerprint=local.fingerprint or parser.fingerprint)
        self._end("migrated" if self.migrating else "forwarded")
        self.answer.whole(200, [(b"content-type", b"application/json")], whole)

    def _local_part(self) -> OutputParser:
        """What this node's engine produced before the seam (nothing, for a request handed over new)."""
        return self.flight.parser if self.flight is not None else OutputParser(chat=self.endpoint == "chat")

    def on_upstream_lost(self, error: str) -> None:
        if self.ended:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.received and not self.skipping:
            self.give_up(f"the replica continuing this answer failed ({error}); retry it")
            return
        # Nothing of this peer's answer came: the next peer (a stale kept-alive connection is not its fault).
        if self.peer is not None and not (upstream is not None and upstream.reused):
            self.gate.peers.failed(self.peer)
        self.skipping = False
        self.next_peer()

    def read_timed_out(self) -> None:
        self.give_up("the replica continuing this answer stopped sending; retry it")

    def _stitched(self, data: bytes) -> None:
        if not data:
            return
        if self.cut_at:
            gate = self.gate
            gate.seam_gaps.append(self.loop.time() - self.cut_at)
            del gate.seam_gaps[:-SEAM_SAMPLES]
            gate.seams += 1
            self.cut_at = 0.0
        if self.parser is not None:
            self.parser.feed(data)
        self.answer.write(data, keep_only=self.assemble)

    # -- ends ------------------------------------------------------------------------------------

    def _client_lost(self) -> None:
        if not self.ended:
            self.close_upstream()
            self._end("client_disconnect")
            self.answer.lost()

    def give_up(self, message: str) -> None:
        """End the client's answer cleanly with a retryable error (or 503): never a torn connection."""
        if self.ended:
            return
        self.close_upstream()
        self._end("migration_failed" if self.migrating else "forward_failed")
        self.index()
        self.answer.interrupted(message)

    def index(self) -> None:
        """Tell the fleet's index where the client's answer is and what it has (the holder may be gone later)."""
        parser, answer, held_by, origin = self.parser, self.answer, self.held_by, self.origin
        if parser is None or held_by is None or origin is None or not self.fingerprint:
            return
        parser.flush()
        local = self._local_part()
        stamp = answer.stamp
        delivered = stamp.offset if stamp is not None else _offset(answer.last_id)
        self.gate.index_cut(answer_id=held_by[1], holder=held_by[0], fingerprint=self.fingerprint, origin=origin,
                            output=local.text + parser.text, tokens=local.content_events + parser.content_events,
                            delivered=delivered, identity=local.identity or parser.identity,
                            role_sent=local.role_sent or parser.role_sent, prefix=self.prefix)

    def _end(self, result: str) -> None:
        self.ended = True
        if self.parser is not None:
            self.parser.flush()
        self.gate.untrack(self)
        self.stop_body()
        self.gate.count(self.endpoint, result)


def _draining(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == DROPPED_REASON_HEADER and value.strip() == b"draining" for name, value in headers)


def _offset(cursor: str | None) -> int:
    """The offset a cursor ends with (``token.offset``); 0 when there is none."""
    if not cursor:
        return 0
    tail = cursor.rpartition(".")[2]
    return int(tail) if tail.isdigit() else 0
