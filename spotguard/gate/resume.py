"""A request that repeats an earlier one is continued where its client is, not computed again.

``Gate.handle`` sends here every journaled request that carries a retry signal (``holding.retry_signal``:
``Last-Event-ID``, ``Spotguard-Resume``, ``Idempotency-Key``, or the openai SDK's retry count); requests
without one never pay for a look-up. Its answer is found, in this order:

1. in this gate's book (the cursor names this gate, or a retry's fingerprint matches an answer held here):
   replayed after the client's offset, then live until it ends;
2. where it moved: with the holder the cursor names, or the one this gate handed it to, or the one the
   fleet's index names (``storage/answer_index.py``): the request is sent there (with a cursor for that
   holder) and its answer relayed as it is;
3. from the index's output so far, when no holder has it: continued on this gate's engine
   (``LocalExchange.begin`` with a ``Continues`` built from the entry), so the client gets the rest.

A stream is resumed exactly after its last event (``Spotguard-Resumed`` on the answer); a non-streaming
request gets one JSON answer with the whole text. A cursor that does not verify (another Authorization,
another request, expired, altered) is refused (409); a retry whose answer is nowhere is computed afresh.
Work that may block (the index) runs in one task per resume request: they come at evictions, not per token.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import anyio

from spotguard.errors import ResumeRefused, StoreError
from spotguard.gate.answer import ClientAnswer
from spotguard.gate.assemble import answer_json
from spotguard.gate.handover import Continues
from spotguard.gate.held import HeldAnswer
from spotguard.gate.holder import HolderLeg
from spotguard.gate.holding import HOLDER_HEADER, LAST_EVENT_ID, RESUME_HEADER, RESUMED_HEADER, header
from spotguard.gate.http1 import ClientConnection
from spotguard.gate.leg import drop
from spotguard.gate.output import OutputParser
from spotguard.gate.peers import FORWARDED_HEADER
from spotguard.gate.request import Request
from spotguard.gate.stitch import AnswerIdentity

if TYPE_CHECKING:
    from spotguard.gate.context import GateContext
    from spotguard.gate.holding import Holding
    from spotguard.storage.answer_index import IndexEntry

RESUME_HEADERS = (LAST_EVENT_ID, RESUME_HEADER)


class Resumption:
    """One retried request, from its body to the end of its answer (or its hand-over to an exchange)."""

    def __init__(self, gate: GateContext, client: ClientConnection, request: Request, endpoint: str) -> None:
        assert gate.holding is not None
        self.gate = gate
        self.holding: Holding = gate.holding
        self.client = client
        self.request = request
        self.endpoint = endpoint
        self.chat = endpoint == "chat"
        self.answer = ClientAnswer(client, request, retry_after=gate.retry_after)
        self.body = b""
        self.stream = False
        self.fingerprint = ""
        self.offset = 0
        """Events the client has."""
        self.text: list[str] = []
        """For a non-streaming answer: the text gathered so far (it is sent whole at the end)."""
        self.usage: dict[str, Any] | None = None
        self.identity: AnswerIdentity | None = None
        self.finish_reason: str | None = None
        self.tried: set[str] = set()
        """Holders asked already (a dead one is asked once)."""
        self.forwarded = any(name.lower() == FORWARDED_HEADER for name, _ in request.headers)
        """Handed over by a draining gate: served here (or by the holder), never handed on again."""
        self.at_holder = header(request.headers, HOLDER_HEADER) is not None
        """Sent here by a gate that believes this one holds the answer: no further hop, whatever is found."""
        self.headers = list(request.headers)
        """As the client sent them (a draining gate hands the request on with its cursor)."""
        self.task: asyncio.Task[None] | None = None
        self.gone = False
        client.on_lost = self._client_lost

    # -- reading the request -----------------------------------------------------------------------

    def read_body(self) -> None:
        request = self.request
        request.on_refused = self._refused
        if request.body_done:
            self._body_in()
        else:
            request.on_done = self._body_in  # the client connection holds the body (``[gate] max_body``)

    def _refused(self, status: int, message: str, limit: str) -> None:
        self._stop(limit)
        self.answer.refused(status, message)

    def _body_in(self) -> None:
        self.request.on_refused = None
        self.body = b"".join(self.request.body)
        self.request.body.clear()
        try:
            original = json.loads(self.body)
        except ValueError:
            original = None
        if not isinstance(original, dict):
            self._fresh()  # not ours to judge: the engine answers it
            return
        self.stream = original.get("stream") is True
        self.fingerprint = self.holding.fingerprint(self.request.headers, self.body)
        self.task = self.gate.spawn(self._resume_or_fail(original), "resume")

    # -- finding the answer --------------------------------------------------------------------------

    async def _resume_or_fail(self, original: dict[str, Any]) -> None:
        try:
            await self._resume(original)
        except Exception as exc:  # a fault here must not leave its client waiting: it is told, and may retry
            self.gate.log.error("gate_resume_failed", endpoint=self.endpoint, error=type(exc).__name__)
            if self.answer.started:
                self.holder_ended("resuming this answer failed here; retry it")
            else:
                self._refuse(502, "resume_failed", "resuming this answer failed here; retry it", "upstream_error")

    async def _resume(self, original: dict[str, Any]) -> None:
        holding, now = self.holding, time.time()
        cursor_text = next((v.decode("ascii", "replace") for n in RESUME_HEADERS
                            if (v := header(self.request.headers, n)) is not None), None)
        answer_id = ""
        if cursor_text is not None:
            try:
                cursor = holding.key.verify(cursor_text, fingerprint=self.fingerprint, now=now)
            except ResumeRefused as exc:
                self._refuse(409, "resume_refused", str(exc), "resume_refused")
                return
            self.offset, answer_id = (cursor.offset if self.stream else 0), cursor.answer_id
        # Its own resume headers are not sent on: a holder gets a cursor of its own.
        self.request.headers = [(n, v) for n, v in self.request.headers if n.lower() not in RESUME_HEADERS]
        if cursor_text is not None and cursor.holder != holding.holder:
            if await self._from_holder(cursor.holder, answer_id):
                return
        held = (holding.book.find(answer_id, time.monotonic()) if answer_id
                else holding.book.find_by_fingerprint(self.fingerprint, time.monotonic()))
        if held is not None:
            answer_id = held.id
            if await self._replay(held):
                return
        if self.gate.draining and self.gate.peers and not (self.forwarded or self.at_holder or self.answer.started):
            self._hand_off()  # this node is going away: a peer finds the answer, and keeps it if it must
            return
        moved = holding.moved.get(answer_id) if answer_id else None
        if moved is not None and self.offset >= moved[1]:
            token, _, _ = moved
            try:
                there = holding.key.verify(f"{token}.{self.offset}", fingerprint=self.fingerprint, now=time.time())
            except ResumeRefused:
                there = None
            if there is not None and await self._from_holder(there.holder, there.answer_id):
                return
        entry = await self._look_up(answer_id)
        if entry is not None:
            if entry.holder != holding.holder and await self._from_holder(entry.holder, entry.answer_id):
                return
            if self._from_store(entry, original):
                return
        if cursor_text is not None and self.offset > 0:
            self._refuse(409, "resume_unavailable", "resume refused: the answer is no longer held anywhere in the "
                         "fleet; send the request again without a cursor", "resume_unavailable")
            return
        self._fresh()

    async def _look_up(self, answer_id: str) -> IndexEntry | None:
        index = self.holding.index
        if index is None or self.gone:
            return None
        deadline = anyio.current_time() + self.holding.lookup_timeout
        try:
            if answer_id:
                found = await index.find(answer_id, self.fingerprint, now=time.time(), deadline=deadline)
                if found is not None:
                    return found
            return await index.find_by_fingerprint(self.fingerprint, now=time.time(), deadline=deadline)
        except (StoreError, ResumeRefused) as exc:
            self.gate.log.warning("resume_index_unavailable", error=str(exc))
            return None

    # -- 1. from this gate's book ---------------------------------------------------------------------

    async def _replay(self, held: HeldAnswer) -> bool:
        """Serve the held answer from the client's offset (a non-streaming one whole: the text before this
        gate's part is its origin's prefix); True when the client got it to its end."""
        if held.finished and not held.complete:
            return False  # cut here: the rest is where it moved, or in the index
        if self.stream:
            local = self.offset - held.origin.base
            if local < 0:
                return False  # the events before this gate's part are elsewhere
        else:
            local = 0
            self.text = [held.origin.prefix]
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_end(reason: str) -> None:
            if not done.done():
                done.set_result(reason == "finished" and held.complete)

        try:
            subscription = self.holding.book.subscribe(held, local, self.events, on_end)
        except ResumeRefused:
            return False
        try:
            whole = await done
        finally:
            subscription.cancel()
        if whole:
            self.finish()
        elif self.stream and self.answer.started:
            self.holder_ended("the answer held here was cut before its end; retry it")
            return True
        return whole

    # -- 2. from the holder ------------------------------------------------------------------------------

    async def _from_holder(self, holder: str, answer_id: str) -> bool:
        """Ask the holder for the rest; True when the client got it (or an end it can retry from)."""
        if self.at_holder or holder in self.tried or self.gone:
            return False
        self.tried.add(holder)
        key = self.holding.key
        cursor = key.issue(holder, answer_id, fingerprint=self.fingerprint,
                           expires=time.time() + self.holding.ttl).at(self.offset)
        leg = HolderLeg(self, holder, cursor)
        self.client.on_pause = leg.paused  # a slow client slows the holder's stream, not the gate's memory
        try:
            return await leg.run()
        finally:
            self.client.on_pause = None

    # -- 3. from the stored output -----------------------------------------------------------------------

    def _from_store(self, entry: IndexEntry, original: dict[str, Any]) -> bool:
        """Continue the entry's answer on this gate's engine; False when the client is not where it was cut."""
        if self.stream and self.offset != entry.delivered:
            return False
        from spotguard.gate.continuation import NotContinuable, continuation_body
        from spotguard.gate.exchange import LocalExchange

        try:
            stored = json.loads(entry.body)
            if not isinstance(stored, dict):
                return False
            body = continuation_body(stored, chat=self.chat, output=entry.output, delivered=entry.tokens,
                                     engine=self.gate.engine_kind)
        except (ValueError, NotContinuable):
            return False
        kept = entry.identity
        cont = Continues(fingerprint=self.fingerprint, base=entry.delivered, tokens=entry.tokens,
                         prefix_chars=len(entry.prefix + entry.output), stream=self.stream, chat=self.chat,
                         identity=AnswerIdentity(id=kept.id, created=kept.created, model=kept.model,
                                                 object=kept.object), role_sent=kept.role_sent)
        if not self.stream:
            body["stream"] = False
        self.client.on_lost = None
        exchange = LocalExchange(self.gate, self.client, self.request, self.endpoint)
        exchange.begin(json.dumps(body, ensure_ascii=False).encode(), body, cont)
        self.gate.count(self.endpoint, "resumed_from_store")
        self.gate.spawn(self._forget(entry), "index-forget")
        return True

    async def _forget(self, entry: IndexEntry) -> None:
        index = self.holding.index
        if index is None:
            return
        try:
            await index.forget(entry.answer_id, entry.fingerprint, deadline=anyio.current_time() + 5.0)
        except StoreError as exc:
            self.gate.log.warning("resume_index_forget_failed", error=str(exc))

    # -- the client's answer ---------------------------------------------------------------------------

    def events(self, data: bytes) -> None:
        """Events of the answer, in final client form, as they come (from the book or a holder)."""
        if self.stream:
            if not self.answer.started:
                self._head_sse()
            self.answer.write(data)
            return
        parser = OutputParser(chat=self.chat)
        parser.feed(data)
        parser.finish()
        self.text.append(parser.text)
        self.identity = self.identity or parser.identity
        self.usage = parser.usage or self.usage
        self.finish_reason = parser.finish_reason or self.finish_reason

    def _head_sse(self) -> None:
        answer = self.answer
        answer.sse = answer.whole_events = answer.track_ids = True
        answer.head(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                          (RESUMED_HEADER, b"1")], None)

    def finish(self) -> None:
        """The whole answer was delivered (stream) or gathered (one JSON answer)."""
        answer = self.answer
        if self.stream:
            if not answer.started:
                self._head_sse()
            answer.complete()
        else:
            whole = answer_json(chat=self.chat, identity=self.identity, text="".join(self.text),
                                finish_reason=self.finish_reason, usage=self.usage)
            answer.whole(200, [(b"content-type", b"application/json"), (RESUMED_HEADER, b"1")], whole)
        self.gate.count(self.endpoint, "resumed")

    def holder_ended(self, message: str) -> None:
        """A holder failed after its answer began: the client resumes again (its cursor says from where)."""
        self.answer.interrupted(message)
        self.gate.count(self.endpoint, "resume_failed")

    def _refuse(self, status: int, result: str, message: str, kind: str) -> None:
        self._stop(result)
        self.answer.error(status, message, kind)

    def _stop(self, result: str) -> None:
        """Answered here without the rest of the body, which is read and dropped; counted as ``result``."""
        self.request.sink, self.request.on_done, self.request.on_refused = drop, None, None
        self.gate.count(self.endpoint, result)

    def _hand_off(self) -> None:
        from spotguard.gate.relay import PeerRelay

        request = self.request
        request.headers = self.headers
        request.body = [self.body]
        request.sink = request.on_done = None
        self.client.on_lost = None
        PeerRelay.hand_off(self.gate, self.client, request, self.endpoint, resumes=True)

    def _fresh(self) -> None:
        """Nothing to resume: the request is answered as a new one (without its resume headers)."""
        if self.gone:
            return
        request = self.request
        request.body = [self.body] if self.body else []
        request.sink = request.on_done = None
        self.client.on_lost = None
        self.gate.dispatch(self.client, request, self.endpoint)

    def _client_lost(self) -> None:
        self.gone = True
        if self.task is not None:
            self.task.cancel()
