"""A fast fake OpenAI-compatible engine (plain ASGI on uvicorn), for the gate's tests and benchmark.

It speaks the public shapes of ``/v1/chat/completions`` and ``/v1/completions`` (streaming SSE with
``data: {...}`` chunks ending in ``data: [DONE]``, or one JSON body) and echoes every other request
back as JSON so pass-through can be checked byte for byte. Test-only knobs ride in the request body
(``x_hold_after``, ``x_token_delay``, ``x_malformed``), which a real engine would ignore.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from spotguard.asgi import Receive, Scope, Send, read_body, serve
from spotguard.gate.listen import nodelay_socket

MODEL = "fake-model"


def token(i: int) -> str:
    return f"tok{i} "


def chat_chunk(i: int, text: str | None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {} if text is None else {"content": text}
    if i == 0:
        delta["role"] = "assistant"
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def completion_chunk(text: str, finish: str | None = None) -> bytes:
    event = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def final_body(chat: bool, text: str) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "length"}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
    return json.dumps({"id": "x-1", "object": "chat.completion" if chat else "text_completion", "created": 1,
                       "model": MODEL, "choices": [choice],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(eq=False)
class FakeEngine:
    """The ASGI app; its attributes record what reached it."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    release: anyio.Event = field(default_factory=anyio.Event)
    """Requests holding (``x_hold_after``) continue once this is set."""
    holding: int = 0
    streams_open: int = 0
    disconnects: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, 64 << 20)
        self.requests.append(Recorded(scope["method"], scope["path"], scope["query_string"],
                                      list(scope["headers"]), body))
        path = scope["path"]
        if scope["method"] == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(path == "/v1/chat/completions", body, receive, send)
        elif path == "/stream-other":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for i in range(5):
                await send({"type": "http.response.body", "body": f"part{i}\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            status = int(dict(_pairs(scope["query_string"])).get("status", "200"))
            echo = {"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                    "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                    "body": base64.b64encode(body).decode()}
            payload = json.dumps(echo).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"x-engine", b"fake"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})

    async def _generate(self, chat: bool, raw: bytes, receive: Receive, send: Send) -> None:
        try:
            request = json.loads(raw)
        except ValueError:
            error = b'{"error":{"message":"invalid JSON","type":"invalid_request_error","code":400}}'
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": error})
            return
        n = int(request.get("max_tokens", 8))
        first = _continued_from(request, chat)
        hold_after = request.get("x_hold_after")
        delay = float(request.get("x_token_delay", 0))
        malformed = request.get("x_malformed", "")
        if not request.get("stream"):
            if hold_after is not None:
                async with anyio.create_task_group() as tg:  # a closed connection cancels the work
                    tg.start_soon(self._watch, receive, tg.cancel_scope, anyio.Event())
                    await self._hold(receive)
                    tg.cancel_scope.cancel()
                if self.release.is_set() is False:
                    return
            if malformed == "json":
                body = b'{"choices": [ this is not json'
            else:
                body = final_body(chat, "".join(token(i) for i in range(first, first + n)))
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.streams_open += 1
        finished = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, receive, tg.cancel_scope, finished)
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
                async for chunk in self._chunks(chat, first, n, hold_after, delay, malformed, receive):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finished.set()
                await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            self.streams_open -= 1

    async def _chunks(self, chat: bool, first: int, n: int, hold_after: int | None, delay: float, malformed: str,
                      receive: Receive) -> AsyncIterator[bytes]:
        for i in range(n):
            if i == hold_after:
                await self._hold(receive)
            if malformed == "sse" and i == 1:
                yield b"data: {this is not json\n\ndata: [1, 2]\n\n"
            yield chat_chunk(i, token(first + i)) if chat else completion_chunk(token(first + i))
            if delay:
                await anyio.sleep(delay)
        yield chat_chunk(n, None, "length") if chat else completion_chunk("", "length")
        yield b"data: [DONE]\n\n"

    async def _hold(self, receive: Receive) -> None:
        self.holding += 1
        try:
            await self.release.wait()
        finally:
            self.holding -= 1

    async def _watch(self, receive: Receive, scope: anyio.CancelScope, finished: anyio.Event) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not finished.is_set():  # after the last byte, uvicorn reports "disconnect" for every request
            self.disconnects += 1
            scope.cancel()


def _continued_from(request: dict[str, Any], chat: bool) -> int:
    """Where the numbering goes on: a continuation (a trailing assistant message to continue, as vLLM is
    told) carries the tokens so far, so its answer is the rest of the uninterrupted one."""
    if not chat or request.get("continue_final_message") is not True:
        return 0
    messages = request.get("messages") or []
    last = messages[-1] if messages else {}
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return 0
    return str(last.get("content") or "").count("tok")


def _pairs(query: bytes) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query.decode())


async def stream_chat(http: httpx.AsyncClient, url: str, body: dict[str, Any], events: list[Any],
                      first: anyio.Event) -> None:
    """POST a streamed chat completion to ``url``: each SSE event's data (parsed JSON, or "[DONE]") goes to
    ``events``; ``first`` is set at the first one."""
    from spotguard.demo.traffic import sse_lines

    async with http.stream("POST", url, json=body) as response:
        async for line in sse_lines(response):
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                first.set()


@asynccontextmanager
async def served() -> AsyncIterator[FakeEngine]:
    """A FakeEngine served on a free loopback port for the duration of the block."""
    engine = FakeEngine()
    async with anyio.create_task_group() as tg:
        bound = await tg.start(serve, engine, nodelay_socket("127.0.0.1", 0))
        engine.url = bound.url
        yield engine
        tg.cancel_scope.cancel()


@pytest.fixture
async def fake_engine() -> AsyncIterator[FakeEngine]:
    """A FakeEngine served on a free loopback port for one test."""
    async with served() as engine:
        yield engine


@pytest.fixture
async def peer_engine() -> AsyncIterator[FakeEngine]:
    """A second FakeEngine: the peer that continues what a draining node had in flight."""
    async with served() as engine:
        yield engine
