"""One request answered by the engine behind the gate.

``Gate.handle``/``Gate.dispatch`` (proxy.py) make one per request they let through to the engine, and
``resume.Resumption`` one to continue an answer from its stored output. A chat/completions
request is journaled: its body is read whole, it becomes a ``Flight`` in the gate's registry, and its
answer is read as it streams (``OutputParser``) so the drain knows the output so far. Anything else is
passed through, its body streamed as it comes.

Where the exchange stands is its ``Phase``; how it ended is the result it counts, decided where it
happens (``_end(result)``), never inferred afterwards. When the drain interrupts a journaled request it
is cut, or - with ``[gate] peers`` - handed to a ``PeerRelay`` (relay.py) that continues the same client
answer on a peer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from spotguard.gate.answer import ClientAnswer, json_headers
from spotguard.gate.assemble import answer_json, streamable, streaming_body
from spotguard.gate.continuation import NotContinuable, continuable, continuation_body
from spotguard.gate.estimate import token_limit
from spotguard.gate.handover import CONTINUES_HEADER, Continues
from spotguard.gate.held import Origin
from spotguard.gate.holding import HOLDER_HEADER, RESUMED_HEADER, header
from spotguard.gate.http1 import ClientConnection
from spotguard.gate.leg import Leg, ReturnedHead, drop
from spotguard.gate.output import OutputParser, meta_of
from spotguard.gate.protocol import EntryState
from spotguard.gate.registry import Flight
from spotguard.gate.relay import PeerRelay
from spotguard.gate.request import Request
from spotguard.gate.stitch import AnswerIdentity, StreamStitch
from spotguard.gate.upstream import UpstreamConnection

if TYPE_CHECKING:
    from spotguard.gate.context import GateContext

CUT_MESSAGE = "request interrupted for migration: this replica is being evicted; retry on another replica"


class Phase(Enum):
    BODY = "body"
    """Reading the request body (a journaled request is sent once it is whole)."""
    SENT = "sent"
    """Sent to the engine; no answer yet."""
    RELAYING = "relaying"
    """The engine's answer is being passed on as it comes."""
    COLLECTING = "collecting"
    """A journaled non-SSE answer, read whole before any of it is sent: a cut before it is complete can
    still be answered with a clean 503 instead of half a body."""
    ASSEMBLING = "assembling"
    """A non-streaming request the engine answers as a stream (``assemble.py``): read as it comes, given to
    the client as one JSON answer at the end."""
    HANDED_OVER = "handed_over"
    """Continued on a peer: the ``PeerRelay`` owns the client's answer now."""
    ENDED = "ended"


class LocalExchange(Leg):
    """A request on its way to the engine and its answer on its way back."""

    __slots__ = ("phase", "flight", "parser", "label", "returned", "readable", "status", "collected", "assembling",
                 "continuable", "cont", "stitch", "prefix", "plain", "feed")

    def __init__(self, gate: GateContext, client: ClientConnection, request: Request, endpoint: str) -> None:
        super().__init__(gate, ClientAnswer(client, request, retry_after=gate.retry_after), endpoint, gate.engine)
        self.phase = Phase.BODY
        self.flight: Flight | None = None
        self.parser: OutputParser | None = None
        self.label = ""
        """A result decided before the answer (``bad_request``): counted whatever the engine then does."""
        self.returned: ReturnedHead | None = None
        self.readable = False
        """A journaled stream whose events the parser can read (SSE, not compressed)."""
        self.status = 0
        self.collected: list[bytes] = []
        self.assembling = False
        """Sent to the engine as a stream, answered to the client as one JSON answer."""
        self.continuable: bool | None = None
        """The request itself allows a continuation elsewhere (one choice, no echo...: ``continuation.py``);
        worked out when first asked (at a drain), not for every request."""
        self.cont: Continues | None = None
        """This request continues an answer another gate began (``handover.py``): this gate holds it now."""
        self.stitch: StreamStitch | None = None
        """With ``cont``: the engine's events joined onto what the client has."""
        self.prefix = ""
        """With ``cont``: the text the client had before this gate's part."""
        self.plain = False
        """From the second chunk of an answer relayed as it comes (an SSE stream the parser reads, no cursors, no
        seam, no hold-back): each chunk is fed and sent, nothing else. The path of nearly every chunk, kept short
        because it is: per chunk, the gate's CPU is what it is measured by against nginx (docs/benchmarks.md)."""
        self.feed: Callable[[bytes], None] = drop
        """With ``plain``: the parser's ``feed``."""
        client.on_lost = self._client_lost
        client.on_pause = self.paused
        request.on_refused = self.refused
        gate.track(self)

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.ENDED, Phase.HANDED_OVER)

    # -- the request -----------------------------------------------------------------------------

    def forward(self) -> None:
        """Passed through: sent at once, the body streamed as it comes."""
        self.phase = Phase.SENT
        self.send()

    def read_body(self) -> None:
        """Journaled: the body is needed whole before anything is sent (the client connection holds it, within
        ``[gate] max_body`` and ``body_memory``: see ``refused``)."""
        request = self.request
        if request.body_done:
            self._journal()
        else:
            request.on_done = self._journal

    def refused(self, status: int, message: str, limit: str) -> None:
        """A client-side limit stopped this request's body (``http1``): answered if nothing was sent yet."""
        if self.finished:
            return
        self.close_upstream()
        started = self.answer.started
        self._end(limit)
        if started:
            self.answer.abort()
        else:
            self.answer.refused(status, message)

    def _journal(self) -> None:
        request = self.request
        body = self.body = b"".join(request.body)
        request.body.clear()
        try:
            original = json.loads(body)
        except ValueError:
            original = None
        if meta_of(original) is None:
            self.label = "bad_request"  # not ours to judge: the engine answers it (400), it is just not journaled
            self.phase = Phase.SENT
            self.send()
            return
        holding = self.gate.holding
        value = header(request.headers, CONTINUES_HEADER) if holding is not None else None
        cont = Continues.from_header(value, holding.key) if value is not None and holding is not None else None
        self.begin(body, original, cont)

    def begin(self, body: bytes, original: dict[str, Any], cont: Continues | None) -> None:
        """Journal the request (``body``, parsed as ``original``) and send it to the engine; with ``cont`` it
        continues an answer the client already has part of."""
        model, stream, slot = meta_of(original) or ("", False, None)
        gate, request, chat = self.gate, self.request, self.endpoint == "chat"
        self.body = body
        client_stream = cont.stream if cont is not None else stream
        if not stream and gate.assembles and streamable(original):
            self.body = json.dumps(streaming_body(original), ensure_ascii=False).encode()
            self.assembling = True
        self.parser = OutputParser(chat=chat, slot_id=slot)
        self.flight = Flight(id=gate.registry.new_id(), endpoint=request.path, model=model, body=body, stream=stream,
                             parser=self.parser, owner=self)
        gate.registry.add(self.flight)
        holding = gate.holding
        if holding is not None:
            if cont is not None:
                self.cont, self.prefix = cont, cont.prefix_of(original)
                self.stitch = StreamStitch(cont.identity, chat=chat, role_sent=cont.role_sent, delivered=cont.tokens)
                fingerprint = cont.fingerprint
            else:
                fingerprint = holding.fingerprint(request.headers, body)
            origin = Origin(endpoint=request.path, model=model, body=body, stream=client_stream,
                            base=cont.base if cont is not None else 0, prefix=self.prefix)
            self.answer.stamp = holding.hold(fingerprint=fingerprint, origin=origin, now=self.loop.time())
        self.phase = Phase.SENT
        self.send()

    # -- the answer (ResponseSink) ----------------------------------------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None:
        returned = self.returned = ReturnedHead(headers)
        answer = self.answer
        if self.flight is not None:
            stamp = answer.stamp
            if stamp is not None:
                if not returned.sse:  # one body, no events: nothing to resume by
                    stamp.book.remove(stamp.answer)
                    answer.stamp = None
                else:
                    returned.headers.append((HOLDER_HEADER, stamp.token.encode()))
                    if self.cont is not None:
                        returned.headers.append((RESUMED_HEADER, b"1"))
            if not returned.sse:
                self.status, self.phase = status, Phase.COLLECTING
                return
            # Only whole events: a migration can join a peer's at a seam, and each event gets its cursor.
            answer.whole_events = bool(self.gate.peers) or stamp is not None
            if self.assembling:
                self.status, self.phase, self.readable = status, Phase.ASSEMBLING, not returned.encoded
                return
            answer.sse = not returned.encoded  # an error event cannot be added to a compressed stream
            self.readable = not returned.encoded
            if returned.encoded and self.parser is not None:
                self.parser.errors += 1  # compressed: passed on, but the output cannot be read
        self.phase = Phase.RELAYING
        answer.head(status, returned.headers, returned.length)

    def on_response_body(self, body: bytes) -> None:
        if self.plain:
            self.feed(body)
            self.answer.send(body)
            return
        flight = self.flight
        if flight is not None and flight.first_token_at is None:
            flight.first_token_at = self.loop.time()
            self._go_plain()
        if self.phase is Phase.COLLECTING:
            self.collected.append(body)
            return
        if self.stitch is not None and self.readable:
            body = self.stitch.feed(body)
            if self.stitch.broken:
                self.upstream_failed("a malformed event in the engine's continuation", timeout=False)
                return
            if not body:
                return
        parser = self.parser
        if self.readable and parser is not None:
            parser.feed(body)
        if self.phase is not Phase.ASSEMBLING:
            self.answer.write(body)
        elif self.answer.stamp is not None:
            self.answer.write(body, keep_only=True)  # held as events: a retry is answered from them

    def _go_plain(self) -> None:
        answer, parser = self.answer, self.parser
        if (self.phase is Phase.RELAYING and self.readable and parser is not None and self.stitch is None
                and not answer.whole_events and answer.stamp is None and not answer.track_ids):
            self.plain, self.feed = True, parser.feed

    def on_response_done(self) -> None:
        self.release_upstream()
        parser, answer = self.parser, self.answer
        if self.phase is Phase.COLLECTING:
            whole = b"".join(self.collected)
            returned = self.returned
            assert returned is not None
            if self.status == 200 and not returned.encoded and parser is not None:
                parser.parse_body(whole)
            self._end(self._ok())
            answer.head(self.status, returned.headers, b"%d" % len(whole))
            answer.complete(collected=whole)
            return
        if self.stitch is not None and self.readable:
            tail = self.stitch.finish()
            if self.stitch.broken:
                self.upstream_failed("a malformed event in the engine's continuation", timeout=False)
                return
            if tail:
                if parser is not None:
                    parser.feed(tail)
                answer.write(tail, keep_only=self.phase is Phase.ASSEMBLING)
        if self.phase is Phase.ASSEMBLING and parser is not None:
            self._assembled(parser)
            return
        if parser is not None and answer.sse and self.flight is not None and self.flight.checked:
            parser.finish()  # nobody needs this output any more: read to its end only to check it can be read
        self._end(self._ok())
        answer.complete()

    def _assembled(self, parser: OutputParser) -> None:
        parser.finish()
        returned, answer = self.returned, self.answer
        assert returned is not None
        if not self.readable:
            self._end("malformed")
            answer.error(502, "the engine's stream could not be read (compressed)", "upstream_error")
            return
        whole = answer_json(chat=self.endpoint == "chat", identity=parser.identity, text=self.prefix + parser.text,
                            finish_reason=parser.finish_reason, usage=parser.usage, fingerprint=parser.fingerprint)
        self._end(self._ok())
        answer.whole(self.status, json_headers(returned.headers), whole)

    def _ok(self) -> str:
        return "malformed" if self.parser is not None and self.parser.errors else "ok"

    def on_upstream_lost(self, error: str) -> None:
        upstream, self.upstream = self.upstream, None
        if self.can_resend(upstream):
            self.retried = True
            self.send()
            return
        self.upstream_failed(error, timeout=False)

    def connect_failed(self, exc: OSError | TimeoutError) -> None:
        self.upstream_failed(type(exc).__name__ if str(exc) == "" else f"{type(exc).__name__}: {exc}",
                             timeout=isinstance(exc, TimeoutError))

    def read_timed_out(self) -> None:
        self.upstream_failed("ReadTimeout", timeout=True)

    def upstream_failed(self, error: str, *, timeout: bool) -> None:
        """Answer 502/504 if nothing was sent yet; otherwise the client sees its answer cut short."""
        if self.finished:
            return
        self.close_upstream()
        started = self.answer.started
        self.gate.log.warning("gate_upstream_error", endpoint=self.endpoint, error=error, started=started)
        self._end("upstream_error")
        if started:
            self.answer.abort()
        else:
            self.answer.error(504 if timeout else 502, f"the engine behind the gate failed: {error}",
                              "upstream_error")

    # -- ends ------------------------------------------------------------------------------------

    def _client_lost(self) -> None:
        holding = self.gate.holding
        if (holding is not None and holding.keep_generating and self.answer.stamp is not None
                and self.phase in (Phase.SENT, Phase.RELAYING, Phase.ASSEMBLING)):
            # Resumable: the engine goes on and the answer is held, so the client can come back for the rest.
            self.answer.detach()
            self.label = "client_disconnect"
            self.paused(False)
            return
        self.cut("client_disconnect")

    def interrupt(self, *, migrate: bool) -> None:
        """The drain wants this request's engine slot: continue it on a peer, or cut it for the snapshot."""
        if migrate:
            self._migrate()
        else:
            self.cut("interrupted")

    def movable(self) -> bool:
        parser, flight = self.parser, self.flight
        if self.finished or parser is None or flight is None or parser.tool_call_started:
            return False
        if self.continuable is None:
            original = json.loads(flight.body)
            self.continuable = continuable(original, chat=self.endpoint == "chat")
            flight.limit = token_limit(original)
        return self.continuable and (self.readable or not self.answer.started)

    def cut(self, reason: str) -> None:
        """Close the engine's connection (it stops and frees the slot) and end the client's answer."""
        if self.finished:
            return
        self.close_upstream()
        self._end(reason)
        if reason == "interrupted":
            self._index()
            self.answer.interrupted(CUT_MESSAGE)
        else:
            self.answer.lost()

    def _index(self) -> None:
        """Cut for good here (no peer took it): the fleet's index says what the client has, to go on elsewhere."""
        holding, stamp, flight, parser = self.gate.holding, self.answer.stamp, self.flight, self.parser
        if holding is None or stamp is None or flight is None or parser is None:
            return
        self.gate.index_cut(answer_id=stamp.answer_id, holder=holding.holder, fingerprint=stamp.answer.fingerprint,
                            origin=stamp.answer.origin, output=parser.text, tokens=parser.content_events, delivered=stamp.offset,
                            identity=parser.identity, role_sent=parser.role_sent, prefix=self.prefix)

    def _migrate(self) -> None:
        flight, parser, answer = self.flight, self.parser, self.answer
        if self.finished or flight is None or parser is None:
            return
        parser.flush()  # the output so far, as far as the client has it (whole events only)
        try:
            if answer.started and not self.readable:
                raise NotContinuable("an answer already begun that is not a readable event stream")
            original = json.loads(flight.body)
            if not isinstance(original, dict):
                raise NotContinuable("the request body is not a JSON object")
            body = continuation_body(original, chat=self.endpoint == "chat", output=parser.text,
                                     delivered=parser.content_events, engine=self.gate.engine_kind,
                                     tool_call_started=parser.tool_call_started)
            if self.assembling:
                body = streaming_body(body)
        except (NotContinuable, ValueError) as exc:
            self.gate.count(self.endpoint, "not_continuable")
            self.gate.log.info("gate_not_continuable", endpoint=self.endpoint, why=str(exc))
            self.cut("interrupted")
            return
        self.close_upstream()  # the engine stops and frees the slot
        flight.state = EntryState.MIGRATED  # final: the snapshot step records it with the peer that took it
        flight.let_go()
        self.gate.reprefilled_tokens += parser.content_events
        answer.drop_held()  # an event the client never got: the peer's continuation covers it
        stitch = None
        if answer.started or self.assembling:
            stitch = StreamStitch(parser.identity or AnswerIdentity(), chat=self.endpoint == "chat",
                                  role_sent=parser.role_sent, delivered=parser.content_events)
        self.phase = Phase.HANDED_OVER
        self.gate.untrack(self)
        relay = PeerRelay(self.gate, answer, self.endpoint, flight=flight, stitch=stitch,
                          assemble=self.assembling, prefix=self.prefix)
        relay.body = json.dumps(body, ensure_ascii=False).encode()
        holding, stamp = self.gate.holding, answer.stamp
        if holding is not None and stamp is not None:
            handover = Continues.of(stamp, parser, before=self.cont, prefix=self.prefix, chat=self.endpoint == "chat")
            relay.extra_headers += ((CONTINUES_HEADER, handover.to_header(holding.key)),)
        relay.next_peer()

    def _end(self, result: str) -> None:
        """Settle the flight and count the result; the client's answer is ended by the caller."""
        if self.finished:
            return
        self.phase = Phase.ENDED
        gate = self.gate
        gate.untrack(self)
        self.stop_body()
        flight, parser = self.flight, self.parser
        if flight is not None:
            flight.let_go()
            if result == "interrupted":
                flight.state = EntryState.CUT  # stays listed until the snapshot step has stored it
                if parser is not None:
                    parser.flush()  # the output is final now: whatever was relayed is in the flight
            else:
                gate.registry.remove(flight.id)
        gate.count(self.endpoint, self.label or result)
        if parser is not None and parser.errors:
            gate.log.warning("gate_malformed_upstream", endpoint=self.endpoint, errors=parser.errors)

