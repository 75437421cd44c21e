"""A vLLM-like stand-in engine, run as its own process, for bench/fleet.py (and its smoke test).

    python -m bench._vllm_like --port P [--tokens-per-second 50] [--shutdown-timeout S] [--count-file F]

What it shares with ``vllm serve`` (the parts a fleet at an eviction depends on):

- OpenAI ``POST /v1/chat/completions`` and ``/v1/completions``, streaming (SSE, one token per event, the
  last token's event carrying ``finish_reason``, a usage chunk when ``stream_options.include_usage``,
  ``data: [DONE]``) or one JSON answer; ``max_tokens`` (chat also ``max_completion_tokens``) tokens at
  ``--tokens-per-second`` per request, whatever else runs (a GPU batches); a client that disconnects
  aborts its request;
- ``GET /health`` (200, also while draining, as vLLM's), ``GET /metrics`` with
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:generation_tokens_total``;
- SIGTERM as with ``--shutdown-timeout S``: new requests get 503, running ones go on for up to S
  seconds, then it exits (cutting what is left).

Its text is deterministic and depends only on the position in the answer: token i is ``w{i} ``. A
continuation starts where the output it is given stops: chat with a final assistant message and
``continue_final_message: true`` (vLLM refuses that together with ``add_generation_prompt: true``),
completions with a prompt ending in the output so far. So a client can check that what it received is
exactly the uninterrupted answer, ``expected_text(max_tokens)``: nothing repeated, nothing missing.

Every token generated (also those of answers cut later) is counted; ``--count-file`` holds the count,
rewritten in place at every token, so it is still right after a SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import time
import uuid
from typing import Any

import anyio

from spotguard.asgi import Receive, Scope, Send, read_body, respond, serve_tcp

MODEL = "vllm-like"
DEFAULT_MAX_TOKENS = 16
_TOKEN = re.compile(r"w(\d+) $")


def token(i: int) -> str:
    return f"w{i} "


def expected_text(tokens: int) -> str:
    """The whole uninterrupted answer of ``tokens`` tokens."""
    return "".join(token(i) for i in range(tokens))


def next_position(output_so_far: str) -> int:
    """Where a continuation of ``output_so_far`` starts: one past its last token, 0 when it has none."""
    found = _TOKEN.search(output_so_far)
    return int(found.group(1)) + 1 if found else 0


class Refused(Exception):
    """A request vLLM would answer with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def plan(chat: bool, body: dict[str, Any]) -> tuple[int, int, int]:
    """(first position, tokens to generate, prompt tokens) for one request; ``Refused`` on a bad one."""
    limit = body.get("max_completion_tokens") if chat else None
    limit = limit if limit is not None else body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise Refused(400, "max_tokens must be a positive integer")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise Refused(400, "messages must be a non-empty list of objects")
        prompt = " ".join(_text(m.get("content")) for m in messages)
        start = 0
        if body.get("continue_final_message"):
            if body.get("add_generation_prompt", True):
                raise Refused(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            if messages[-1].get("role") != "assistant":
                raise Refused(400, "continue_final_message needs a final assistant message")
            start = next_position(_text(messages[-1].get("content")))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise Refused(400, "prompt must be a string")
        start = next_position(prompt)
    return start, limit, len(prompt.split())


class Engine:
    """The ASGI app, its counters and its drain state."""

    def __init__(self, tokens_per_second: float, count_file: str | None) -> None:
        self.delay = 1.0 / tokens_per_second
        self.stopping = False
        self.running = 0
        self.generated = 0
        self._requests: set[anyio.CancelScope] = set()
        self._count_fd = os.open(count_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if count_file else -1
        self._count()

    def _count(self) -> None:
        # One pwrite per token: the page cache keeps it even when the process is SIGKILLed a moment later.
        if self._count_fd >= 0:
            os.pwrite(self._count_fd, b"%20d\n" % self.generated, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await respond(send, 200, b"")
        elif path == "/metrics":
            await respond(send, 200, self.metrics(), content_type="text/plain; version=0.0.4")
        elif scope["method"] == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(path == "/v1/chat/completions", receive, send)
        else:
            await _error(send, 404, "not found")

    def metrics(self) -> str:
        return (f"vllm:num_requests_running{{model_name=\"{MODEL}\"}} {self.running}\n"
                f"vllm:num_requests_waiting{{model_name=\"{MODEL}\"}} 0\n"
                f"vllm:generation_tokens_total{{model_name=\"{MODEL}\"}} {self.generated}\n")

    async def _generate(self, chat: bool, receive: Receive, send: Send) -> None:
        raw = await read_body(receive, 16 << 20)
        if self.stopping:
            await _error(send, 503, "the server is shutting down")
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise Refused(400, "the body must be a JSON object")
            start, count, prompt_tokens = plan(chat, body)
        except ValueError:
            await _error(send, 400, "the body is not JSON")
            return
        except Refused as exc:
            await _error(send, exc.status, str(exc))
            return
        answer = Answer(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                        prompt_tokens)
        self.running += 1
        try:
            async with anyio.create_task_group() as tg:
                self._requests.add(tg.cancel_scope)
                tg.start_soon(_abort_on_disconnect, receive, tg.cancel_scope)
                if body.get("stream"):
                    usage = bool((body.get("stream_options") or {}).get("include_usage"))
                    await self._stream(answer, start, count, usage, send)
                else:
                    text = "".join([piece async for piece in self._tokens(start, count)])
                    await respond(send, 200, answer.whole(text, count), content_type="application/json")
                tg.cancel_scope.cancel()
        finally:
            self._requests.discard(tg.cancel_scope)
            self.running -= 1

    def cut(self) -> None:
        """End every running request now (its client sees the connection close mid-answer)."""
        for scope in self._requests:
            scope.cancel()

    async def _tokens(self, start: int, count: int) -> Any:
        began = time.monotonic()
        for i in range(count):
            await anyio.sleep(max(0.0, began + (i + 1) * self.delay - time.monotonic()))
            self.generated += 1
            self._count()
            yield token(start + i)

    async def _stream(self, answer: Answer, start: int, count: int, usage: bool, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

        async def event(data: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"})

        if answer.chat:
            await event(answer.chunk({"role": "assistant", "content": ""}, None))
        sent = 0
        async for piece in self._tokens(start, count):
            sent += 1
            finish = "length" if sent == count else None
            await event(answer.chunk({"content": piece}, finish) if answer.chat else answer.chunk(piece, finish))
        if usage:
            await event({**answer.head("chat.completion.chunk" if answer.chat else "text_completion"),
                         "choices": [], "usage": answer.usage(count)})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


class Answer:
    """The identity and shapes of one answer."""

    def __init__(self, chat: bool, ident: str, created: int, prompt_tokens: int) -> None:
        self.chat, self.ident, self.created, self.prompt_tokens = chat, ident, created, prompt_tokens

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.ident, "object": obj, "created": self.created, "model": MODEL}

    def usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def chunk(self, piece: dict[str, str] | str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {**self.head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}]}
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}

    def whole(self, text: str, count: int) -> str:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return json.dumps({**self.head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                           "usage": self.usage(count)})


async def _error(send: Send, status: int, message: str) -> None:
    body = {"error": {"message": message, "type": "BadRequestError" if status < 500 else "ServiceUnavailableError",
                      "code": status}}
    await respond(send, status, json.dumps(body), content_type="application/json")


async def _abort_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()  # vLLM aborts a request whose client went away; the tokens it made are still counted


async def main(args: argparse.Namespace) -> None:
    engine = Engine(args.tokens_per_second, args.count_file)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_tcp, engine, args.host, args.port)
            async for _ in signals:
                break
            engine.stopping = True  # new requests get 503; /health stays 200, as vLLM's does
            with anyio.move_on_after(args.shutdown_timeout):
                while engine.running:
                    await anyio.sleep(0.05)
            engine.cut()
            with anyio.move_on_after(1.0):
                while engine.running:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--shutdown-timeout", type=float, default=0.0,
                        help="seconds running requests may go on after SIGTERM (vLLM's default 0 cuts them at once)")
    parser.add_argument("--count-file", help="file holding the number of tokens generated so far")
    return parser.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse_args(), backend="asyncio")
