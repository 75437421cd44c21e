"""Every SSE event of a resumable answer gets its cursor, and is kept in the held-answer book.

The gate passes on only whole events when resume is on (``ClientAnswer.whole_events``); ``Stamp.events``
takes such whole events, ends each with an ``id: <cursor>`` line (its position in the client's
answer, signed as ``cursor.py`` says), hands each to the book exactly as the client gets it, and returns
the bytes to send. A block without a ``data:`` line (a keep-alive comment) is sent as it is, neither
counted nor kept: an ``id:`` on it would move the client's last event id without an event.
"""

from __future__ import annotations

import time

from spotguard.gate.cursor import AnswerCursors
from spotguard.gate.held import HeldAnswer, HeldBook


class Stamp:
    """One answer's cursors and its place in the book."""

    __slots__ = ("cursors", "answer", "book", "offset")

    def __init__(self, cursors: AnswerCursors, answer: HeldAnswer, book: HeldBook, *, base: int = 0) -> None:
        self.cursors = cursors
        self.answer = answer
        self.book = book
        self.offset = base
        """Events of the client's answer so far (this gate's and, on a continuation, the ones before)."""

    @property
    def answer_id(self) -> str:
        return self.answer.id

    @property
    def token(self) -> str:
        """The signed part of this answer's cursors (``Spotguard-Holder``): a cursor is it plus an offset."""
        return self.cursors.signed.prefix.rstrip(".")

    def last(self) -> str:
        """The cursor of the last event the client got (what it resumes after)."""
        return self.cursors.at(self.offset, time.time())

    def events(self, data: bytes) -> bytes:
        """Whole events in, the same events with their ``id:`` lines out (each kept in the book)."""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        blocks = data.split(b"\n\n")
        tail = blocks.pop()  # after the last blank line: nothing, for whole events
        now = time.time()
        out: list[bytes] = []
        book, answer, cursors = self.book, self.answer, self.cursors
        for block in blocks:
            if b"data:" not in block:
                out.append(block + b"\n\n")
                continue
            self.offset += 1
            # Last, so that it wins over an id the engine may have put on the event itself.
            event = block + b"\nid: " + cursors.at(self.offset, now).encode() + b"\n\n"
            book.append(answer, event)
            out.append(event)
        if tail:
            out.append(tail)
        return b"".join(out)

    def finish(self, now: float, *, complete: bool) -> None:
        """No event follows (``complete``: the answer ended whole): it is kept ``ttl`` from now."""
        self.book.finish(self.answer, now, complete=complete)
