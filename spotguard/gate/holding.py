"""This gate's part in resuming answers (``[resume]``): the fleet key, the URL other gates reach it on, the
answers it holds (``held.py``), the answers it handed to another holder, and the fleet's answer index.

Headers between clients, gates and peers:

- ``Last-Event-ID`` (streams) / ``Spotguard-Resume`` (a non-streaming answer's 503): a cursor the client
  resumes from; ``Idempotency-Key`` and the openai SDK's ``x-stainless-retry-count`` mark a retry that
  carries none (then the request's fingerprint finds the answer);
- ``Spotguard-Holder``: on an answer's head, the signed token of the gate that holds it (a cutting gate
  learns from it who took a continuation over, even behind a load balancer);
- ``Spotguard-Resumed``: on an answer that continues the one a cursor names (``spotguard.client`` joins
  only those);
- ``Spotguard-Continues``: on a continuation from another gate, what the client already has (see
  ``handover.py``).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import anyio
import structlog

from spotguard.errors import StoreError
from spotguard.gate.cursor import AnswerCursors, CursorKey, advertised_holder, new_answer_id
from spotguard.gate.held import HeldBook, Origin
from spotguard.gate.stamp import Stamp
from spotguard.gate.targets import Target

if TYPE_CHECKING:
    from spotguard.config import Config
    from spotguard.gate.stitch import AnswerIdentity
    from spotguard.metrics import Metrics
    from spotguard.storage.answer_index import AnswerIndex, IndexEntry

LAST_EVENT_ID = b"last-event-id"
RESUME_HEADER = b"spotguard-resume"
RESUMED_HEADER = b"spotguard-resumed"
HOLDER_HEADER = b"spotguard-holder"
IDEMPOTENCY_KEY = b"idempotency-key"
RETRY_COUNT = b"x-stainless-retry-count"
AUTH_HEADERS = (b"authorization", b"api-key", b"x-api-key")
"""What binds an answer to its requester: any of these the request carries."""
HOLDER_CONNECT_TIMEOUT = 1.0
"""Seconds to connect to a holder: a dead one must not hold the client up (the index is next)."""
MAX_TARGETS = 32
"""Holders whose connections are kept at once (a few at an eviction)."""


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value.strip()
    return None


def credentials(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's credentials, as the fingerprint binds them (empty when it has none)."""
    return b"\n".join(value.strip() for key, value in headers if key.lower() in AUTH_HEADERS)


def retry_signal(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request says it repeats an earlier one: only these pay for a look-up."""
    for key, value in headers:
        lowered = key.lower()
        if lowered in (LAST_EVENT_ID, RESUME_HEADER, IDEMPOTENCY_KEY):
            return True
        if lowered == RETRY_COUNT and value.strip() not in (b"", b"0"):
            return True
    return False


def private_address() -> str:
    """The address this host sends from by default (no packet is sent: a UDP socket is only routed)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any remote address, never reached
        return str(probe.getsockname()[0])
    except OSError:
        return ""
    finally:
        probe.close()


class Holding:
    """Resume, as one gate takes part in it."""

    def __init__(self, *, key: CursorKey, holder: str, book: HeldBook, index: AnswerIndex | None = None,
                 keep_generating: bool = True, lookup_timeout: float = 2.0) -> None:
        self.key = key
        self.holder = holder
        """This gate's base URL as other gates reach it (named in its cursors)."""
        self.book = book
        self.index = index
        self.keep_generating = keep_generating
        self.lookup_timeout = lookup_timeout
        self.targets: dict[str, Target] = {}
        """Kept-alive connections to the other holders this gate asked (a few at a time)."""
        self.moved: dict[str, tuple[str, int, float]] = {}
        """Answers this gate handed to another holder: answer id -> (that holder's token, the offset its
        part starts at, until when it is worth knowing)."""

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics, log: structlog.stdlib.BoundLogger) -> Holding | None:
        """None when ``[resume] key_file`` is empty (resume off). Raises ConfigError for a broken setting."""
        resume = config.resume
        if not resume.key_file:
            return None
        key = CursorKey.load(resume.key_file)
        holder = advertised_holder(resume.advertise, config.gate.listen, private_address())
        book = HeldBook(ttl=resume.ttl, max_bytes=resume.max_bytes, max_answer_bytes=resume.max_answer_bytes,
                        log=log, metrics=metrics)
        index = None
        if resume.index and config.snapshot.url:
            index = _open_index(config, key, metrics)
        return cls(key=key, holder=holder, book=book, index=index, keep_generating=resume.keep_generating,
                   lookup_timeout=resume.lookup_timeout)

    @property
    def ttl(self) -> float:
        return self.book.ttl

    def fingerprint(self, headers: list[tuple[bytes, bytes]], body: bytes) -> str:
        return self.key.fingerprint(credentials(headers), body)

    def hold(self, *, fingerprint: str, origin: Origin, now: float) -> Stamp:
        """Start holding a new answer: its cursors and its place in the book."""
        answer_id = new_answer_id()
        cursors = AnswerCursors(self.key, self.holder, answer_id, fingerprint=fingerprint, ttl=self.ttl,
                                now=time.time())
        return Stamp(cursors, self.book.add(answer_id, fingerprint, origin, now), self.book, base=origin.base)

    def target(self, holder: str) -> Target:
        """Where to send a request for an answer ``holder`` holds (its connections are kept alive)."""
        found = self.targets.pop(holder, None)
        if found is None:
            found = Target(holder, connect_timeout=HOLDER_CONNECT_TIMEOUT, what="a resume cursor's holder")
            if len(self.targets) >= MAX_TARGETS:
                oldest = next(iter(self.targets))
                self.targets.pop(oldest).pool.close()
        self.targets[holder] = found  # the most recent last
        return found

    def close(self) -> None:
        for target in self.targets.values():
            target.pool.close()
        self.targets.clear()

    def index_entry(self, *, answer_id: str, holder: str, fingerprint: str, origin: Origin, output: str, tokens: int,
                    delivered: int, identity: AnswerIdentity, role_sent: bool, prefix: str) -> IndexEntry:
        """The index entry of an answer cut here: who holds it now, and what its client has."""
        from spotguard.storage.answer_index import IndexEntry, KeptIdentity

        now = time.time()
        return IndexEntry(answer_id=answer_id, fingerprint=fingerprint, holder=holder, endpoint=origin.endpoint,
                          model=origin.model, stream=origin.stream, body=origin.body, output=output,
                          delivered=delivered, tokens=tokens, prefix=prefix,
                          identity=KeptIdentity(id=identity.id, created=identity.created, model=identity.model,
                                                object=identity.object, role_sent=role_sent),
                          created=now, expires=now + self.ttl)

    async def write_index(self, entry: IndexEntry, seconds: float, log: structlog.stdlib.BoundLogger) -> None:
        """Write ``entry`` within ``seconds``; a store that fails is logged (ids only), never raised."""
        if self.index is None:
            return
        try:
            await self.index.write(entry, deadline=anyio.current_time() + seconds)
        except StoreError as exc:
            log.warning("resume_index_write_failed", answer=entry.answer_id, error=str(exc))

    def moved_to(self, answer_id: str, token: str, base: int) -> None:
        self.moved[answer_id] = (token, base, time.time() + self.ttl)

    def sweep(self, now: float) -> None:
        self.book.sweep(now)
        wall = time.time()
        for answer_id in [a for a, (_, _, until) in self.moved.items() if until <= wall]:
            del self.moved[answer_id]


def _open_index(config: Config, key: CursorKey, metrics: Metrics) -> AnswerIndex:
    from spotguard.storage import crypto
    from spotguard.storage.answer_index import AnswerIndex
    from spotguard.storage.store import StoreOptions, open_store

    snap = config.snapshot
    store = open_store(snap.url, StoreOptions.from_config(snap))
    seal = crypto.load_key(snap.encryption_key_file) if snap.encryption_key_file else None
    return AnswerIndex(store, index_key=key.index_key, seal_key=seal, metrics=metrics)
