"""A retried request sent to the gate that holds its answer, and that answer relayed as it is.

Used by ``resume.Resumption``: the holder (named by a cursor, by where this gate handed the answer, or by
the fleet's index) gets the same request with a cursor of its own (``Last-Event-ID``) and the loop guard,
replays what the client lacks and goes on live. Its events are already in final client form, with its
cursors, so they pass through; a non-streaming answer comes back whole. A holder that is gone (refused,
unknown answer, nothing sent) lets the resumption try the next place; one that fails mid-answer ends the
client's answer with a retryable error whose cursor is the last event the client got.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from spotguard.gate.holding import HOLDER_HEADER, LAST_EVENT_ID
from spotguard.gate.leg import Leg, ReturnedHead
from spotguard.gate.upstream import UpstreamConnection

if TYPE_CHECKING:
    from spotguard.gate.answer import ClientAnswer
    from spotguard.gate.context import GateContext


class Resuming(Protocol):
    """What the holder's answer is passed to (``resume.Resumption``)."""

    gate: GateContext
    answer: ClientAnswer
    endpoint: str
    body: bytes
    stream: bool

    def events(self, data: bytes) -> None:
        """Events of the answer, in final client form, as they come."""

    def finish(self) -> None:
        """The whole answer was delivered (or gathered)."""

    def holder_ended(self, message: str) -> None:
        """The holder failed after its answer began."""


class HolderLeg(Leg):
    """One try at the holder; ``await run()`` says whether the client's answer was served (or ended there)."""

    __slots__ = ("resumption", "done", "began", "skipping", "collected", "head")

    def __init__(self, resumption: Resuming, holder: str, cursor: str) -> None:
        gate = resumption.gate
        assert gate.holding is not None
        super().__init__(gate, resumption.answer, resumption.endpoint, gate.holding.target(holder))
        self.resumption = resumption
        self.body = resumption.body
        self.extra_headers = ((LAST_EVENT_ID, cursor.encode()), (HOLDER_HEADER, b"1"), gate.forwarded_header)
        self.done: asyncio.Future[bool] = self.loop.create_future()
        self.began = False
        """The holder answered 200: its answer is the client's now."""
        self.skipping = False
        self.collected: list[bytes] = []
        self.head: ReturnedHead | None = None

    async def run(self) -> bool:
        self.gate.track(self)
        self.send()
        try:
            return await self.done
        finally:
            self.gate.untrack(self)
            if not self.done.done() or not self.began:
                self.close_upstream()

    @property
    def finished(self) -> bool:
        return self.done.done()

    def _settle(self, served: bool) -> None:
        if not self.done.done():
            self.done.set_result(served)

    def connect_failed(self, exc: OSError | TimeoutError) -> None:
        self._settle(False)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], upstream: UpstreamConnection) -> None:
        if status != 200:
            self.skipping = True  # the holder does not have it (any more): read and dropped, then the next place
            return
        self.began = True
        self.head = ReturnedHead(headers)

    def on_response_body(self, body: bytes) -> None:
        if self.skipping:
            return
        if self.resumption.stream:
            self.resumption.events(body)
        else:
            self.collected.append(body)

    def on_response_done(self) -> None:
        self.release_upstream()
        if self.skipping:
            self._settle(False)
            return
        if self.resumption.stream:
            self.resumption.finish()
        else:
            assert self.head is not None
            whole = b"".join(self.collected)
            self.answer.head(200, self.head.headers, b"%d" % len(whole))
            self.answer.complete(collected=whole)
            self.gate.count(self.endpoint, "resumed")
        self._settle(True)

    def on_upstream_lost(self, error: str) -> None:
        upstream, self.upstream = self.upstream, None
        if self.can_resend(upstream):
            self.retried = True
            self.send()
            return
        self._failed(f"the replica holding this answer failed ({error}); retry it")

    def read_timed_out(self) -> None:
        self._failed("the replica holding this answer stopped sending; retry it")

    def _failed(self, message: str) -> None:
        if self.done.done():
            return
        self.close_upstream()
        if self.began and self.answer.started:
            self.resumption.holder_ended(message)
            self._settle(True)
        else:
            self._settle(False)
