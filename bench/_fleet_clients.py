"""bench/fleet.py's clients: the openai SDK (default retries) sending through the load balancer, and what
each call received, checked against the engine's deterministic answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from openai import AsyncOpenAI, OpenAIError

from bench._vllm_like import expected_text

CLASSES = ("during_drain", "finishable", "outlasting", "others")
PROMPT = "Count for me, please."
"""Ends in no ``w{i}`` token, so every answer starts at w0."""


@dataclass
class Call:
    """One SDK call (its retries included) and what it ended with."""

    group: str
    """``background``, ``finishable`` or ``outlasting``."""
    chat: bool
    stream: bool
    max_tokens: int
    sent_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.text.split())

    @property
    def lost(self) -> bool:
        """It raised, or its text is not exactly the uninterrupted answer, or it had no finish_reason."""
        return (self.error is not None or self.finish_reason is None
                or self.text != expected_text(self.max_tokens))


@dataclass(frozen=True)
class Clients:
    """The SDK clients of one variant: one for streams (through the resume helper, where used), one plain."""

    streams: AsyncOpenAI
    plain: AsyncOpenAI
    note: str

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.streams.close()
            await self.plain.close()


def open_clients(base_url: str, *, resumable: bool) -> Clients:
    """SDK clients with their defaults (2 retries); streams through the resume helper when ``resumable``."""
    plain = AsyncOpenAI(base_url=base_url + "/v1", api_key="bench")
    if not resumable:
        return Clients(AsyncOpenAI(base_url=base_url + "/v1", api_key="bench"), plain, "plain SDK clients")
    http: Any
    try:
        from spotguard.client import resumable_async_http_client
    except ImportError:
        http = httpx.AsyncClient()
        note = ("spotguard.client.resumable_async_http_client is MISSING: streams use a plain httpx client "
                "(nothing resumes them)")
    else:
        http = resumable_async_http_client()
        note = "streams through spotguard.client.resumable_async_http_client()"
    return Clients(AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", http_client=http), plain, note)


async def run_call(clients: Clients, call: Call) -> None:
    """Make ``call`` through the SDK and record what it received; never raises (but is cancellable)."""
    client = clients.streams if call.stream else clients.plain
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if call.stream else {}
    call.sent_at = time.monotonic()
    try:
        if call.chat:
            answer = await client.chat.completions.create(
                model="vllm-like", messages=[{"role": "user", "content": PROMPT}], max_tokens=call.max_tokens,
                stream=call.stream, **extra)
        else:
            answer = await client.completions.create(model="vllm-like", prompt=PROMPT, max_tokens=call.max_tokens,
                                                     stream=call.stream, **extra)
        if call.stream:
            async for chunk in answer:
                for choice in chunk.choices:
                    piece = choice.delta.content if call.chat else choice.text
                    call.text += piece or ""
                    call.finish_reason = choice.finish_reason or call.finish_reason
        else:
            choice = answer.choices[0]
            call.text = (choice.message.content if call.chat else choice.text) or ""
            call.finish_reason = choice.finish_reason
    except (OpenAIError, httpx.HTTPError) as exc:
        call.error = f"{type(exc).__name__}: {exc}"[:300]
    call.ended_at = time.monotonic()


@dataclass
class Background:
    """Clients that keep a steady stream of short requests (chat and completions, streamed or not)."""

    clients: Clients
    workers: int
    max_tokens: int
    think_s: float
    calls: list[Call] = field(default_factory=list)
    running: int = 0
    go: anyio.Event = field(default_factory=anyio.Event)
    stop: bool = False

    async def pause(self) -> None:
        """No new requests until ``resume``; returns once none is in flight (bounded)."""
        self.go = anyio.Event()
        with anyio.fail_after(30):
            while self.running:
                await anyio.sleep(0.01)

    def resume(self) -> None:
        self.go.set()

    def finish(self) -> None:
        """No new requests from now on (the ones in flight go on)."""
        self.stop = True
        self.go.set()

    async def worker(self, index: int) -> None:
        turn = index
        while not self.stop:
            await self.go.wait()
            if self.stop:
                return
            call = Call("background", chat=turn % 2 == 0, stream=(turn // 2) % 2 == 0,
                        max_tokens=self.max_tokens)
            turn += 1
            self.calls.append(call)
            self.running += 1
            try:
                await run_call(self.clients, call)
            finally:
                self.running -= 1
            await anyio.sleep(self.think_s)


def classify(call: Call, notice: float, kill: float) -> str:
    """The class of one call: the long ones by their group; the others by when they were sent."""
    if call.group != "background":
        return call.group
    return "during_drain" if notice <= call.sent_at < kill else "others"
