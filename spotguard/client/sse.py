"""Watching an SSE stream while passing it on whole events at a time: the last ``id:``, ``[DONE]``, and the
resumable error event a gate ends a cut answer with (held back from the application)."""

from __future__ import annotations

import json

RESUMABLE_ERROR = "interrupted_for_migration"
MAX_EVENT = 8 << 20
"""Bytes of one SSE event held while it arrives; a longer one turns the stream into a plain pass-through."""


class SseJoin:
    """Passes an SSE stream on whole events at a time and watches it: the last ``id:``, ``[DONE]``, and the
    resumable error event, which it holds back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self.last_id: str | None = None
        self.done = False
        self.interrupted: bytes | None = None
        """The resumable error event, held back from the application."""
        self.plain = False
        """An event too large to hold: from then on bytes pass straight through and nothing is resumed."""

    def feed(self, chunk: bytes) -> bytes:
        if self.plain:
            return chunk
        buffer = self._buffer
        buffer += chunk
        passed: list[bytes] = []
        start = 0
        while True:
            end = _blank_line(buffer, max(start, self._scanned))
            if end < 0:
                break
            event = bytes(buffer[start:end])
            start = end
            if self._watch(event):
                passed.append(event)
        del buffer[:start]
        self._scanned = max(0, len(buffer) - 2)
        if len(buffer) > MAX_EVENT:
            self.plain = True
            passed.append(bytes(buffer))
            buffer.clear()
        return b"".join(passed)

    def tail(self) -> bytes:
        """What is left at a clean end (an event without its blank line): passed on as it is."""
        rest = bytes(self._buffer)
        self.restart()
        return rest

    def restart(self) -> None:
        """A new answer joins: a torn event's start is dropped (the holder sends it again, whole)."""
        self._buffer.clear()
        self._scanned = 0
        self.interrupted = None

    def _watch(self, event: bytes) -> bool:
        data: list[bytes] = []
        event_id: bytes | None = None
        for line in event.split(b"\n"):
            line = line.removesuffix(b"\r")
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line.startswith(b"id:"):
                event_id = line[4:] if line.startswith(b"id: ") else line[3:]
        if event_id is not None and b"\x00" not in event_id:  # the WHATWG rule: an id with NUL is ignored
            self.last_id = event_id.decode("utf-8", "replace")
        text = b"\n".join(data)
        if text == b"[DONE]":
            self.done = True
        elif RESUMABLE_ERROR.encode() in text and _is_resumable_error(text):
            self.interrupted = event
            return False
        return True

    def verdict(self, error: Exception | None) -> str:
        """After an answer's body ended: ``done``, ``resume`` or ``fail``."""
        if self.plain:
            return "fail" if error is not None else "done"
        if self.interrupted is not None:
            return "resume" if self.last_id else "fail"
        if error is None or self.done:  # a break after [DONE] loses nothing
            return "done"
        return "resume" if self.last_id else "fail"

    def ending(self, error: Exception | None, verdict: str) -> bytes:
        """The last bytes of a stream that will not be resumed: the tail of a whole answer, or the server's
        error event; a broken connection with nothing to show raises its error."""
        if verdict == "done":
            return self.tail()
        if self.interrupted is not None:
            return self.interrupted
        if error is not None:
            raise error
        return b""


def _blank_line(buffer: bytearray, start: int) -> int:
    """The end (exclusive) of the first event in ``buffer`` ending at or after ``start``, or -1."""
    ends = [i for i in (buffer.find(b"\n\n", start), buffer.find(b"\n\r\n", start)) if i >= 0]
    if not ends:
        return -1
    first = min(ends)
    return first + (2 if buffer.startswith(b"\n\n", first) else 3)


def _is_resumable_error(text: bytes) -> bool:
    try:
        data = json.loads(text)
    except ValueError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("type") == RESUMABLE_ERROR and error.get("resumable") is True


