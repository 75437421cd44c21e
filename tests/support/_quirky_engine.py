"""A small HTTP/1.1 server on loopback that behaves the way real engines do when they are not polite, for the
gate's tests (raw asyncio streams: a framework would smooth over exactly what is tested here):

- ``POST /v1/embeddings``: answers ``401`` as soon as the head is in, before reading the body, and keeps the
  connection open; then, as uvicorn does, reads what is left of that body before the next request (vLLM
  with ``--api-key`` answers so, from a middleware that never reads the body);
- ``GET /v1/models``: ``103 Early Hints`` first, then the ``200``;
- ``POST /v1/responses``: ``101 Switching Protocols`` (an engine that upgrades what the gate does not proxy);
- anything else: reads the body (but not a GET's or HEAD's: like many servers it never expects one there,
  so such a body is read as the next request), then ``200`` with JSON naming the request.

Every request head it read is recorded (``seen``), headers included, so a test can check what reached it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class QuirkyEngine:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                line, *lines = head.decode("latin-1").split("\r\n")
                if line.count(" ") < 2:
                    return  # not a request line (a smuggled body's chunk framing, say): hang up like a server would
                method, target, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
                length = int(headers.get("content-length", "0"))
                if method == "POST" and target == "/v1/embeddings":
                    self.seen.append(Seen(method, target, headers, b""))
                    writer.write(_answer(401, {"error": {"message": "invalid api key", "type": "unauthorized"}}))
                    await writer.drain()
                    await reader.readexactly(length)  # what is left of it: the next request waits behind
                    continue
                elif method == "GET" and target == "/v1/models":
                    body = b""
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </v1/models/x>; rel=preload\r\n\r\n")
                    await writer.drain()
                    writer.write(_answer(200, {"object": "list", "data": [], "request": len(self.seen) + 1}))
                elif method == "POST" and target == "/v1/responses":
                    body = await reader.readexactly(length)
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
                else:
                    body = b"" if method in ("GET", "HEAD") else await reader.readexactly(length)
                    writer.write(_answer(200, {"id": "x-1", "object": "chat.completion", "path": target,
                                               "request": len(self.seen) + 1, "body_bytes": len(body),
                                               "choices": [{"index": 0, "finish_reason": "stop",
                                                            "message": {"role": "assistant", "content": "ok"}}]}))
                self.seen.append(Seen(method, target, headers, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.writers.discard(writer)
            writer.close()


def _answer(status: int, doc: object) -> bytes:
    body = json.dumps(doc).encode()
    reason = {200: "OK", 401: "Unauthorized"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"\r\n").encode() + body


@asynccontextmanager
async def quirky_engine(tls: ssl.SSLContext | None = None) -> AsyncIterator[QuirkyEngine]:
    """Serve a QuirkyEngine on a free loopback port (https with ``tls``) until the block ends."""
    engine = QuirkyEngine()
    server = await asyncio.start_server(engine.serve_connection, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    engine.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield engine
    finally:
        server.close()
        for writer in list(engine.writers):
            writer.close()
