"""The answer a client gets: one per request, written by whoever serves it (the engine, then maybe a peer).

Keeping the client's side in one object is what lets a migration hand an answer from the local exchange
to a peer relay mid-stream: the head, the framing (chunked or not) and the SSE events already sent stay
with the answer, not with the leg that produced them.

Ends, all through here:

- ``complete``: the whole answer is out; the connection moves on to the next request;
- ``error``: a whole JSON error from the gate itself, when nothing of an answer was sent yet;
- ``interrupted``: an answer already begun ends with a final SSE error event and a clean end of the
  body (a non-SSE one is closed: it cannot carry an event), never a torn connection;
- ``abort``: the connection is dropped (the client sees its answer cut short).
"""

from __future__ import annotations

import json

from spotguard.gate.http1 import ClientConnection, Request, status_line
from spotguard.gate.peers import DROPPED_REASON_HEADER

LAST_CHUNK = b"0\r\n\r\n"


def error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


def error_event(message: str) -> bytes:
    """The last SSE event of an answer that could not be finished here: the client may retry it."""
    return (b'data: {"error":{"message":' + json.dumps(message).encode()
            + b',"type":"interrupted_for_migration","code":503}}\n\n')


def json_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` of an answer the gate turns into one JSON body (an assembled stream)."""
    kept = [(name, value) for name, value in headers if name.lower() not in (b"content-type", b"cache-control")]
    return [*kept, (b"content-type", b"application/json")]


def json_error(connection: ClientConnection, request: Request, status: int, message: str, kind: str, *,
               retry_after: bytes | None = None) -> None:
    """A whole JSON error answer from the gate itself; ``retry_after`` marks it as a draining refusal."""
    body = error_body(message, kind, status)
    close = not request.keep_alive or not request.body_done
    connection.write(b"".join((
        status_line(status), b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        b"retry-after: " + retry_after + b"\r\n" + DROPPED_REASON_HEADER + b": draining\r\n"
        if retry_after is not None else b"",
        b"connection: close\r\n" if close else b"", b"\r\n", body)))
    connection.finish(request, close=close)


class ClientAnswer:
    """The response to one client request, from its head to its end."""

    __slots__ = ("client", "request", "retry_after", "started", "chunked", "close_after", "sse", "whole_events",
                 "held", "ended")

    def __init__(self, client: ClientConnection, request: Request, *, retry_after: bytes) -> None:
        self.client = client
        self.request = request
        self.retry_after = retry_after
        self.started = False
        """The head is out: from here on only the body (and how it ends) can change."""
        self.chunked = False
        self.close_after = False
        """No framing (an HTTP/1.0 client): the end of the body is the end of the connection."""
        self.sse = False
        self.whole_events = False
        """Send only whole SSE events (with peers: a migration can then join the peer's events at a seam)."""
        self.held = b""
        """The start of an SSE event not sent yet (``whole_events``)."""
        self.ended = False

    def head(self, status: int, headers: list[tuple[bytes, bytes]], length: bytes | None) -> None:
        request = self.request
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts.append(b"content-length: " + length + b"\r\n")
        elif request.method == b"HEAD" or status in (204, 304):
            pass
        elif request.http10:
            self.close_after = True
        else:
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.close_after or not request.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.client.write(b"".join(parts))
        self.started = True

    def write(self, body: bytes) -> None:
        """Body bytes, framed; with ``whole_events`` an unfinished SSE event waits for its end."""
        if self.whole_events:
            body = self._whole_events(body)
            if not body:
                return
        self.send(body)

    def send(self, body: bytes) -> None:
        """Body bytes as they are (framed), bypassing the hold-back."""
        if self.chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def _whole_events(self, body: bytes) -> bytes:
        data = self.held + body if self.held else body
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:
            self.held = data
            return b""
        self.held = data[end:]
        return data[:end]

    def drop_held(self) -> None:
        """Forget the unfinished event held back: a peer's continuation covers it."""
        self.held = b""

    def complete(self, *, collected: bytes | None = None) -> None:
        """The whole answer is out (``collected``: a body read whole, sent now with its length)."""
        if self.ended:
            return
        self.ended = True
        if self.held:
            self.send(self.held)
            self.held = b""
        if collected is not None:
            self.client.write(collected)
        elif self.chunked:
            self.client.write(LAST_CHUNK)
        self.client.finish(self.request, close=self.close_after)

    def error(self, status: int, message: str, kind: str, *, draining: bool = False) -> None:
        """A whole JSON error from the gate (nothing of an answer was sent yet)."""
        if self.ended:
            return
        self.ended = True
        json_error(self.client, self.request, status, message, kind,
                   retry_after=self.retry_after if draining else None)

    def interrupted(self, message: str) -> None:
        """End an answer this replica cannot finish so that the client can retry it cleanly."""
        if self.ended:
            return
        if not self.started:
            self.error(503, message, "interrupted_for_migration", draining=True)
            return
        self.ended = True
        client = self.client
        if self.chunked:
            event = error_event(message) if self.sse else b""
            client.write((b"%x\r\n%s\r\n" % (len(event), event) if event else b"") + LAST_CHUNK)
            client.finish(self.request)
        else:
            client.close()

    def abort(self) -> None:
        self.ended = True
        self.client.abort()
