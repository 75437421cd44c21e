"""One client request as the gate holds it: its head, what the HTTP layer makes of it, and its body as it
arrives. ``ClientConnection`` (http1.py) fills it; whoever serves the request takes its body."""

from __future__ import annotations

import http
from collections.abc import Callable

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
"""Headers that concern one connection, never passed on by a proxy (RFC 9110 section 7.6.1)."""
VERSIONS = frozenset({"1.1", "1.0"})
"""The HTTP versions the gate speaks (another gets 505)."""
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


NO_BODY_METHODS = frozenset({b"GET", b"HEAD"})
"""A body here is refused: an engine that ignores it leaves the bytes to be read as a second, hidden request."""


class Request:
    """One client request: its head, and its body as it arrives (to ``sink`` once someone takes it)."""

    __slots__ = ("method", "target", "path", "headers", "keep_alive", "http10", "chunked", "length",
                 "body", "body_done", "body_size", "sink", "on_done", "on_refused", "responded",
                 "expect_continue", "invalid", "buffered", "ahead", "charged")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool,
                 http10: bool) -> None:
        self.method = method
        self.target = target
        path = target.split(b"?", 1)[0]
        self.path = path.decode("latin-1")
        self.headers = headers
        self.keep_alive = keep_alive
        self.http10 = http10
        self.chunked = False
        self.length: int | None = None
        self.expect_continue = False
        hosts = 0
        coding = b""
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                self.length = int(value) if value.strip().isdigit() else None
            elif lowered == b"transfer-encoding":
                coding = value.strip().lower()
                self.chunked = coding == b"chunked"
            elif lowered == b"host":
                hosts += 1
            elif lowered == b"expect":
                self.expect_continue = value.strip().lower() == b"100-continue"
        self.invalid: tuple[int, str] | None = None
        """Why the HTTP layer refuses it (status, message), if it does."""
        if hosts > 1 or (hosts == 0 and not http10):
            self.invalid = (400, "a request needs exactly one Host header" if hosts else
                            "no Host header (HTTP/1.1 requires one)")
        elif coding and not self.chunked:
            self.invalid = (501, f"Transfer-Encoding {coding.decode('latin-1')!r} is not supported (only chunked)")
        elif method in NO_BODY_METHODS and self.has_body:
            self.invalid = (400, f"a {method.decode()} request cannot have a body")
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False
        self.buffered = 0
        """Bytes put in ``body`` by the connection (no sink yet)."""
        self.ahead = 0
        """Of those, bytes that came while an earlier request was served (counted against ``read_ahead``)."""
        self.charged = 0
        """Bytes held against the process-wide ``body_memory`` budget (given back when the answer is done)."""
        self.sink: Callable[[bytes], None] | None = None
        """Takes body chunks as they arrive; until set, they pile up in ``body`` (held, within the limits)."""
        self.on_done: Callable[[], None] | None = None
        """Called once the whole body is in. Set without a sink: the body is wanted whole in ``body``."""
        self.on_refused: Callable[[int, str, str], None] | None = None
        """Called when a limit stops the body (status, message, the limit's key): whoever serves the request
        answers it (if nothing was sent yet) and ends; the connection closes after."""
        self.responded = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    @property
    def collecting(self) -> bool:
        """The body is wanted whole in memory (not streamed on)."""
        return self.sink is None and self.on_done is not None
