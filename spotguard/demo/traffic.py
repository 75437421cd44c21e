"""What a real client sends through the gate, and what it actually received.

A request counts as completed only when its answer ended properly: a non-streaming 200 with a
``finish_reason``, or a stream that carried a ``finish_reason`` and then ``[DONE]``. Wherever the answer was
produced (this replica, or a peer the gate moved it to), a completed answer is completed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx

PROMPT = [{"role": "user", "content": "Tell me a long story about spot instances."}]


@dataclass(frozen=True)
class Ask:
    name: str
    stream: bool
    max_tokens: int


@dataclass
class Answer:
    ask: Ask
    status: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    done: bool = False
    error: str = ""
    began: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    first_token: anyio.Event = field(default_factory=anyio.Event)

    @property
    def completed(self) -> bool:
        if self.status != 200 or self.finish_reason is None:
            return False
        return self.done or not self.ask.stream

    def finished_after(self, moment: float) -> bool:
        """Completed, and after ``moment`` (``time.monotonic()``): past the node's deadline, the fleet finished it."""
        return self.completed and self.ended > moment

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.began

    def outcome(self) -> str:
        if self.completed:
            return f"completed  {self.tokens:>5} tokens in {self.seconds:.1f}s ({self.finish_reason})"
        why = self.error or (f"HTTP {self.status}" if self.status != 200 else "the answer ended without a finish")
        return f"lost       after {self.tokens} tokens, {self.seconds:.1f}s: {why}"


def body(ask: Ask) -> dict[str, object]:
    return {"model": "tiny", "messages": PROMPT, "max_tokens": ask.max_tokens, "stream": ask.stream,
            "ignore_eos": True}


async def send(http: httpx.AsyncClient, gate: str, answer: Answer) -> None:
    """Send one request and record what came back; never raises for what the network or server does."""
    url = gate + "/v1/chat/completions"
    try:
        if answer.ask.stream:
            await _stream(http, url, answer)
        else:
            answer.first_token.set()  # nothing arrives before the end: it is in flight once sent
            response = await http.post(url, json=body(answer.ask))
            answer.status = response.status_code
            if response.status_code == 200:
                choice = response.json()["choices"][0]
                answer.finish_reason = choice.get("finish_reason")
                answer.tokens = int(response.json().get("usage", {}).get("completion_tokens", 0))
            else:
                answer.error = f"HTTP {response.status_code}: {response.text[:120]}"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        answer.ended = time.monotonic()
        answer.first_token.set()


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an SSE stream, split only where SSE splits them (CR, LF, CRLF).

    Not ``aiter_lines``: it also splits on U+0085, U+2028 and other characters ``str.splitlines`` knows,
    which a model may put, unescaped, inside an event's JSON (the tiny test model does).
    """
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *lines, pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


async def _stream(http: httpx.AsyncClient, url: str, answer: Answer) -> None:
    async with http.stream("POST", url, json=body(answer.ask)) as response:
        answer.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            return
        async for line in sse_lines(response):
            if not line.startswith("data: "):
                continue
            data = line[6:].strip()
            if data == "[DONE]":
                answer.done = True
                continue
            event = json.loads(data)
            if isinstance(event.get("error"), dict):
                answer.error = f"{event['error'].get('type', 'error')}: {event['error'].get('message', '')}"
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    answer.tokens += 1
                    answer.first_token.set()
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]


def summary_line(answers: list[Answer], engine_note: str = "", *, vm_gone_at: float = 0.0) -> str:
    """What the clients received, counted from them; answers completed after ``vm_gone_at`` (the node's
    deadline) were finished by the fleet."""
    sent = len(answers)
    completed = sum(a.completed for a in answers)
    line = f"in-flight requests: {sent} sent, {completed} completed, {sent - completed} lost"
    late = sum(a.finished_after(vm_gone_at) for a in answers) if vm_gone_at else 0
    if late:
        line += f"; {late} finished by replica 2 after this node's deadline"
    return line + (f" ({engine_note})" if engine_note else "")
