"""The held-answer book: each answer's output events, kept for ``[resume] ttl`` so a client can resume it.

The gate adds an answer when it starts relaying it, appends every event exactly as the client got it
(final client form, ``id:`` line included), and finishes it when the answer ends, however it ends. A
resume request is served by ``subscribe``: the events after the client's offset at once, then each new
one as it arrives, then the end. Callbacks only: the gate's data path is asyncio protocols, and a task
per request would cost more than the answer.

Memory is bounded by ``max_bytes`` (events, request bodies, and a fixed overhead per event and answer):
past it the oldest answer goes, finished ones before running ones; an answer that outgrows
``max_answer_bytes`` is dropped on its own instead of pushing out the others. Either way its client is
not touched: only resuming it becomes impossible. Finished answers expire ``ttl`` after their end, in
one ``sweep`` (finish order is expiry order, so a sweep looks only at what expires). Running answers do
not expire: they are live, and the gate finishes every answer it adds.

Pure data structure, no I/O and no clock of its own: times are the caller's monotonic seconds. Nothing of
a body or an event reaches the log (ids and sizes only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from spotguard.errors import ResumeRefused

if TYPE_CHECKING:
    import structlog

    from spotguard.metrics import Metrics

EndReason = Literal["finished", "evicted", "too_big", "expired", "removed"]
"""How a subscription ends: the answer finished (every event was delivered), or it left the book first."""

ANSWER_OVERHEAD = 512
"""Bytes counted per answer beyond its body and events: the objects and index entries that hold it."""
EVENT_OVERHEAD = 48
"""Bytes counted per event beyond its length: the bytes object's header and its slot in the list."""


@dataclass(frozen=True, kw_only=True)
class Origin:
    """The request an answer answers, as the client sent it: what continuing it elsewhere needs."""

    endpoint: str
    model: str
    body: bytes
    stream: bool
    base: int = 0
    """Events of the client's answer another gate delivered before this one took it over (a continuation):
    the offset of this answer's first event."""
    prefix: str = ""
    """The text those events carried (a non-streaming answer is assembled from it and the events held)."""


class Subscription:
    """A resume request following a held answer; ``cancel`` when its client goes away."""

    __slots__ = ("_answer", "on_data", "on_end")

    def __init__(self, answer: HeldAnswer, on_data: Callable[[bytes], None],
                 on_end: Callable[[EndReason], None]) -> None:
        self._answer: HeldAnswer | None = answer
        self.on_data = on_data
        self.on_end = on_end

    @property
    def active(self) -> bool:
        return self._answer is not None

    def cancel(self) -> None:
        """Stop following; on_end is not called. Safe to call from a callback and more than once."""
        answer, self._answer = self._answer, None
        if answer is not None and self in answer.subscribers:
            answer.subscribers.remove(self)

    def _end(self, reason: EndReason) -> None:
        if self._answer is not None:
            self._answer = None
            self.on_end(reason)


class HeldAnswer:
    """One answer in the book. The gate keeps the handle and appends through the book."""

    __slots__ = ("id", "fingerprint", "origin", "events", "size", "finished", "complete", "created", "expires",
                 "gone", "subscribers")

    def __init__(self, answer_id: str, fingerprint: str, origin: Origin, now: float) -> None:
        self.id = answer_id
        self.fingerprint = fingerprint
        self.origin = origin
        self.events: list[bytes] = []
        self.size = ANSWER_OVERHEAD + len(origin.body)
        self.finished = False
        self.complete = False
        """It finished whole (the engine's last event is held), not cut or failed."""
        self.created = now
        self.expires: float | None = None
        """Set when it finishes: ``ttl`` after its end."""
        self.gone: EndReason | None = None
        """Why it left the book; None while it is held."""
        self.subscribers: list[Subscription] = []

    @property
    def delivered(self) -> int:
        """Events appended so far: the offset of the next one."""
        return len(self.events)


@dataclass(frozen=True)
class HeldStats:
    answers: int
    bytes: int
    evictions: dict[str, int]


class HeldBook:
    """Answers held for resuming, by id and by request fingerprint, within a byte cap."""

    def __init__(self, *, ttl: float, max_bytes: int, max_answer_bytes: int, log: structlog.stdlib.BoundLogger,
                 metrics: Metrics | None = None) -> None:
        if ttl <= 0 or max_bytes <= 0 or max_answer_bytes <= 0:
            raise ValueError("ttl, max_bytes and max_answer_bytes must be positive")
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_answer_bytes = min(max_answer_bytes, max_bytes)
        self._log = log
        self._metrics = metrics
        self._running: OrderedDict[str, HeldAnswer] = OrderedDict()
        """By start: the order running answers are evicted in."""
        self._finished: OrderedDict[str, HeldAnswer] = OrderedDict()
        """By end: the order finished answers expire and are evicted in."""
        self._by_fingerprint: dict[str, list[HeldAnswer]] = {}
        self.bytes = 0
        self._evictions: dict[str, int] = {}
        if metrics is not None:
            metrics.resume_held_bytes.set_function(lambda: self.bytes)
            metrics.resume_held_answers.set_function(lambda: len(self))

    def __len__(self) -> int:
        return len(self._running) + len(self._finished)

    # -- the gate's side: one answer as it is relayed ------------------------------------------------

    def add(self, answer_id: str, fingerprint: str, origin: Origin, now: float) -> HeldAnswer:
        """Start holding an answer; the handle is for ``append`` and ``finish``."""
        if answer_id in self._running or answer_id in self._finished:
            raise ValueError(f"answer {answer_id} is held already")
        answer = HeldAnswer(answer_id, fingerprint, origin, now)
        self._running[answer_id] = answer
        self._by_fingerprint.setdefault(fingerprint, []).append(answer)
        self.bytes += answer.size
        self._enforce(answer)
        return answer

    def append(self, answer: HeldAnswer, event: bytes) -> None:
        """One event exactly as the client got it; passed on to the answer's subscribers at once."""
        if answer.gone is not None:
            return
        if answer.finished:
            raise ValueError(f"answer {answer.id} has finished: no event can follow")
        answer.events.append(event)
        grown = len(event) + EVENT_OVERHEAD
        answer.size += grown
        self.bytes += grown
        for subscription in tuple(answer.subscribers):
            subscription.on_data(event)
        self._enforce(answer)

    def finish(self, answer: HeldAnswer, now: float, *, complete: bool = True) -> None:
        """The answer ended, ``complete`` or cut (or failed): subscribers are ended, and it expires ``ttl`` from
        now."""
        if answer.gone is not None or answer.finished:
            return
        answer.finished = True
        answer.complete = complete
        answer.expires = now + self.ttl
        del self._running[answer.id]
        self._finished[answer.id] = answer
        self._end_subscribers(answer, "finished")

    def remove(self, answer: HeldAnswer) -> None:
        """Stop holding an answer (one not worth resuming); its subscribers end with ``removed``."""
        if answer.gone is None:
            self._drop(answer, "removed")

    # -- the resume side -----------------------------------------------------------------------------

    def find(self, answer_id: str, now: float) -> HeldAnswer | None:
        """The held answer with this id; None when there is none or it has expired."""
        answer = self._running.get(answer_id) or self._finished.get(answer_id)
        return answer if answer is not None and not _expired(answer, now) else None

    def find_by_fingerprint(self, fingerprint: str, now: float) -> HeldAnswer | None:
        """The newest held answer to the request with this fingerprint (see ``cursor.request_fingerprint``)."""
        for answer in reversed(self._by_fingerprint.get(fingerprint, ())):
            if not _expired(answer, now):
                return answer
        return None

    def subscribe(self, answer: HeldAnswer, offset: int, on_data: Callable[[bytes], None],
                  on_end: Callable[[EndReason], None]) -> Subscription:
        """Replay the events after the first ``offset`` (in one ``on_data`` call), then follow live ones until
        ``on_end``. ResumeRefused when the answer left the book or the offset is past its events."""
        if answer.gone is not None:
            raise ResumeRefused(answer.gone, f"resume refused: the answer is no longer held ({answer.gone})")
        if not 0 <= offset <= len(answer.events):
            raise ResumeRefused("offset", f"resume refused: offset {offset} is past the {len(answer.events)} "
                                "events of the answer")
        subscription = Subscription(answer, on_data, on_end)
        answer.subscribers.append(subscription)
        backlog = answer.events[offset:]
        if backlog:
            on_data(backlog[0] if len(backlog) == 1 else b"".join(backlog))
        if answer.finished and subscription.active:
            answer.subscribers.remove(subscription)
            subscription._end("finished")  # noqa: SLF001 - the book owns its subscriptions
        return subscription

    def sweep(self, now: float) -> int:
        """Forget the finished answers whose ttl has passed; call about once a second. Returns how many."""
        count = 0
        finished = self._finished
        while finished:
            answer = next(iter(finished.values()))
            if answer.expires is None or answer.expires > now:
                break
            self._drop(answer, "expired")
            count += 1
        return count

    def stats(self) -> HeldStats:
        return HeldStats(len(self), self.bytes, dict(self._evictions))

    # -- the cap -------------------------------------------------------------------------------------

    def _enforce(self, grown: HeldAnswer) -> None:
        if grown.size > self.max_answer_bytes:
            self._evict(grown, "too_big")
        while self.bytes > self.max_bytes:
            victims = self._finished or self._running
            self._evict(next(iter(victims.values())), "evicted")

    def _evict(self, answer: HeldAnswer, reason: EndReason) -> None:
        self._evictions[reason] = self._evictions.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.resume_evictions.labels(reason=reason).inc()
        # Ids and sizes only: the events are user data.
        self._log.info("resume_answer_evicted", answer=answer.id, reason=reason, bytes=answer.size,
                       events=len(answer.events), finished=answer.finished, held_bytes=self.bytes - answer.size,
                       held_answers=len(self) - 1)
        self._drop(answer, reason)

    def _drop(self, answer: HeldAnswer, reason: EndReason) -> None:
        answer.gone = reason
        (self._finished if answer.finished else self._running).pop(answer.id, None)
        same = self._by_fingerprint.get(answer.fingerprint)
        if same is not None:
            same.remove(answer)
            if not same:
                del self._by_fingerprint[answer.fingerprint]
        self.bytes -= answer.size
        answer.events = []
        self._end_subscribers(answer, reason)

    @staticmethod
    def _end_subscribers(answer: HeldAnswer, reason: EndReason) -> None:
        subscribers, answer.subscribers = answer.subscribers, []
        for subscription in subscribers:
            subscription._end(reason)  # noqa: SLF001 - the book owns its subscriptions


def _expired(answer: HeldAnswer, now: float) -> bool:
    return answer.expires is not None and answer.expires <= now
