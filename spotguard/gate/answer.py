"""The answer a client gets: one per request, written by whoever serves it (the engine, then maybe a peer).

Keeping the client's side in one object is what lets a migration hand an answer from the local exchange
to a peer relay mid-stream: the head, the framing (chunked or not) and the SSE events already sent stay
with the answer, not with the leg that produced them.

Ends, all through here:

- ``complete``: the whole answer is out; the connection moves on to the next request;
- ``error``: a whole JSON error from the gate itself, when nothing of an answer was sent yet;
- ``interrupted``: an answer already begun ends with a final SSE error event and a clean end of the
  body, never a torn connection; one that cannot carry an event (not SSE, or framed by its length or by
  the connection's end) is closed, so its client sees it short rather than complete;
- ``lost``: the client went away; the answer ends written to no one (what is held of it is final);
- ``abort``: the connection is dropped (the client sees its answer cut short).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from spotguard.gate.holding import RESUME_HEADER
from spotguard.gate.http1 import ClientConnection
from spotguard.gate.peers import DROPPED_REASON_HEADER
from spotguard.gate.request import Request, status_line

if TYPE_CHECKING:
    from spotguard.gate.stamp import Stamp

LAST_CHUNK = b"0\r\n\r\n"


def error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


def error_event(message: str, cursor: str | None = None) -> bytes:
    """The last SSE event of an answer that could not be finished here: the client may retry it, and with a
    ``cursor`` (the last event it got) resume it (``spotguard.client`` does)."""
    if cursor is None:
        return (b'data: {"error":{"message":' + json.dumps(message).encode()
                + b',"type":"interrupted_for_migration","code":503}}\n\n')
    return (b'data: {"error":{"message":' + json.dumps(message).encode()
            + b',"type":"interrupted_for_migration","code":503,"resumable":true}}\nid: ' + cursor.encode() + b"\n\n")


def json_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` of an answer the gate turns into one JSON body (an assembled stream)."""
    kept = [(name, value) for name, value in headers if name.lower() not in (b"content-type", b"cache-control")]
    return [*kept, (b"content-type", b"application/json")]


def json_error(connection: ClientConnection, request: Request, status: int, message: str, kind: str, *,
               retry_after: bytes | None = None, dropped: bytes = b"draining", resume: str | None = None) -> None:
    """A whole JSON error answer from the gate itself; ``retry_after`` (with the ``dropped`` reason, when one)
    says when to try again, ``resume`` gives the cursor a retry resumes from (``Spotguard-Resume``)."""
    body = error_body(message, kind, status)
    close = not request.keep_alive or not request.body_done
    connection.write(b"".join((
        status_line(status), b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        b"retry-after: " + retry_after + b"\r\n" if retry_after is not None else b"",
        DROPPED_REASON_HEADER + b": " + dropped + b"\r\n" if retry_after is not None and dropped else b"",
        RESUME_HEADER + b": " + resume.encode() + b"\r\n" if resume is not None else b"",
        b"connection: close\r\n" if close else b"", b"\r\n", body)))
    connection.finish(request, close=close)


class ClientAnswer:
    """The response to one client request, from its head to its end."""

    __slots__ = ("client", "request", "retry_after", "started", "chunked", "close_after", "sse", "whole_events",
                 "held", "ended", "stamp", "detached", "last_id", "track_ids")

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
        self.stamp: Stamp | None = None
        """Resume is on: every event gets its cursor and is held (``stamp.py``)."""
        self.detached = False
        """The client went away and the answer goes on for resuming: nothing is written any more."""
        self.track_ids = False
        """The events come with cursors of another holder (relayed as they are): remember the last one."""
        self.last_id: str | None = None

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

    def write(self, body: bytes, *, keep_only: bool = False) -> None:
        """Body bytes, framed; with ``whole_events`` an unfinished SSE event waits for its end; with a stamp each
        event gets its cursor and is held. ``keep_only``: held, not sent (an answer assembled at the end)."""
        if self.whole_events:
            body = self._whole_events(body)
            if not body:
                return
        if self.stamp is not None:
            body = self.stamp.events(body)
        elif self.track_ids:
            self._track(body)
        if not keep_only:
            self.send(body)

    def send(self, body: bytes) -> None:
        """Body bytes as they are (framed), bypassing the hold-back."""
        if self.detached:
            return
        if self.chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def _track(self, body: bytes) -> None:
        at = body.rfind(b"\nid: ")
        if at < 0:
            if not body.startswith(b"id: "):
                return
            at = -1
        end = body.find(b"\n", at + 5)
        self.last_id = body[at + 5:end if end >= 0 else None].strip().decode("ascii", "replace")

    def cursor(self) -> str | None:
        """Where the client resumes from: the cursor of the last event it got, when the answer has cursors."""
        if self.stamp is not None:
            return self.stamp.last()
        return self.last_id

    def detach(self) -> None:
        """The client went away: the answer goes on (held for resuming), written to no one."""
        self.detached = True

    def _finish_stamp(self, *, complete: bool = False) -> None:
        stamp, self.stamp = self.stamp, None
        if stamp is not None:
            stamp.finish(time.monotonic(), complete=complete)

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
        if self.held and collected is None:  # an assembled answer's held tail is in ``collected`` already
            self.send(self.held)
        self.held = b""
        self._finish_stamp(complete=True)
        if self.detached:
            return
        if collected is not None:
            self.client.write(collected)
        elif self.chunked:
            self.client.write(LAST_CHUNK)
        self.client.finish(self.request, close=self.close_after)

    def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The answer as one body, head and all (a stream the gate read whole and turned into JSON)."""
        self.head(status, headers, b"%d" % len(body))
        self.complete(collected=body)

    def error(self, status: int, message: str, kind: str, *, draining: bool = False,
              retry_after: bool = False) -> None:
        """A whole JSON error from the gate (nothing of an answer was sent yet): ``draining`` says it is a
        draining refusal, ``retry_after`` only that the client may try again (a busy gate)."""
        if self.ended:
            return
        self.ended = True
        self._finish_stamp()
        if not self.detached:
            json_error(self.client, self.request, status, message, kind,
                       retry_after=self.retry_after if draining or retry_after else None,
                       dropped=b"draining" if draining else b"")

    def refused(self, status: int, message: str) -> None:
        """A client-side limit stopped the request's body (``http1``): 413 for a body over ``max_body``, or 503,
        with Retry-After, when the gate holds as many bodies as it may (the client may try again shortly)."""
        self.error(status, message, "unavailable" if status == 503 else "invalid_request", retry_after=status == 503)

    def interrupted(self, message: str) -> None:
        """End an answer this replica cannot finish so that the client can retry it cleanly: with cursors, a
        stream's last event names where to resume, and a non-streaming answer's 503 says it
        (``Spotguard-Resume``, ``Retry-After: 1``)."""
        if self.ended:
            return
        cursor = self.cursor()
        self.ended = True
        self._finish_stamp()
        if self.detached:
            return
        client = self.client
        if not self.started:
            json_error(client, self.request, 503, message, "interrupted_for_migration",
                       retry_after=b"1" if cursor is not None else self.retry_after, resume=cursor)
        elif self.chunked and self.sse:
            event = error_event(message, cursor)
            client.write(b"%x\r\n%s\r\n" % (len(event), event) + LAST_CHUNK)
            client.finish(self.request)
        else:
            client.close()  # a clean end would pass a short body off as the whole answer

    def lost(self) -> None:
        """The client went away and its answer ends here: written to no one, and a held copy is final (a
        resume of it gets what there is, not a wait for more)."""
        self.detached = True
        if self.ended:
            return
        self.ended = True
        self._finish_stamp()

    def abort(self) -> None:
        self.ended = True
        self._finish_stamp()
        self.client.abort()
