"""The stand-in engine, for when llama-server cannot be built: ``python -m spotguard.demo.standin PORT``.

A real process with an OpenAI-style ``/v1/chat/completions`` (streaming or not; one "tok" per
``TOKEN_DELAY`` seconds, ``max_tokens`` of them) and ``/health``. On SIGTERM it does what a draining
engine does: new requests get 503, running ones finish, then it exits.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import anyio

from spotguard.asgi import Receive, Scope, Send, read_body, respond, serve_tcp

TOKEN_DELAY = 0.02


class StandIn:
    def __init__(self) -> None:
        self.stopping = False
        self.running = 0
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await respond(send, 503 if self.stopping else 200, "stopping" if self.stopping else "ok")
            return
        if path != "/v1/chat/completions":
            await respond(send, 404, "not found")
            return
        if self.stopping:
            await respond(send, 503, "stopping: no new work")
            return
        body: dict[str, Any] = json.loads(await read_body(receive) or b"{}")
        self.running += 1
        try:
            await self._answer(body, send)
        finally:
            self.running -= 1
            self.served += 1

    async def _answer(self, body: dict[str, Any], send: Send) -> None:
        tokens = int(body.get("max_tokens") or 16)
        ident = {"id": f"chatcmpl-standin-{self.served}", "model": "stand-in", "created": int(time.time())}
        if not body.get("stream"):
            await anyio.sleep(tokens * TOKEN_DELAY)
            answer = {**ident, "object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "tok " * tokens}}],
                "usage": {"completion_tokens": tokens}}
            await respond(send, 200, json.dumps(answer), content_type="application/json")
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for index in range(tokens + 1):
            delta, finish = ({"content": "tok "}, None) if index < tokens else ({}, "length")
            chunk = {**ident, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
            await anyio.sleep(TOKEN_DELAY)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def main(port: int) -> None:
    app = StandIn()
    async with anyio.create_task_group() as tg:
        await tg.start(serve_tcp, app, "127.0.0.1", port)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                app.stopping = True
                break
        while app.running:
            await anyio.sleep(0.05)  # the running requests finish; nothing new is taken
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), backend="asyncio")
