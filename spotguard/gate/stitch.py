"""Joining a peer's continuation onto the answer a client already has, so it sees one answer.

Streaming: every peer event is rewritten to carry the local answer's ``id``, ``model``, ``created`` and
``object``; the assistant ``role`` is not sent twice; ``usage`` (only there when the client asked for it)
counts the tokens delivered before the seam; ``[DONE]`` is sent once. A malformed peer event stops it
(``broken``): the leg then ends the answer as interrupted, never passes it off as whole. (A non-streaming
answer is read from the engine as a stream, so it is joined the same way and sent as one JSON at the end.)

Bytes in, bytes out, no I/O: the gate's data path feeds what the peer sends and writes what comes back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_EVENT = 1 << 20
"""Bytes of one unfinished peer event kept before the stream is declared broken."""


@dataclass(frozen=True)
class AnswerIdentity:
    """What the client saw on the local answer's events, carried onto the peer's."""

    id: str | None = None
    model: str | None = None
    created: int | None = None
    object: str | None = None

    @classmethod
    def of(cls, event: dict[str, Any]) -> AnswerIdentity:
        created = event.get("created")
        return cls(id=_str(event.get("id")), model=_str(event.get("model")),
                   created=created if isinstance(created, int) else None, object=_str(event.get("object")))

    def apply(self, event: dict[str, Any]) -> None:
        for key in ("id", "model", "created", "object"):
            value = getattr(self, key)
            if value is not None:
                event[key] = value


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def add_usage(usage: Any, delivered: int) -> Any:
    """The peer's usage with the tokens delivered before the seam moved from prompt to completion (the peer
    counted the output so far as prompt)."""
    if not isinstance(usage, dict):
        return usage
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        usage = {**usage, "prompt_tokens": max(0, prompt - delivered), "completion_tokens": completion + delivered}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


class StreamStitch:
    """Rewrites a peer's SSE stream into the continuation of the client's."""

    def __init__(self, identity: AnswerIdentity, *, chat: bool, role_sent: bool, delivered: int) -> None:
        self._identity = identity
        self._chat = chat
        self._role_sent = role_sent
        self._delivered = delivered
        self._tail = b""
        self.done = False
        """``[DONE]`` was written."""
        self.finish_reason: str | None = None
        self.text: list[str] = []
        """What the peer added (for the journal: a second cut must not lose it)."""
        self.events = 0
        self.broken = False
        """A peer event was malformed or too big: nothing more is passed on, and the leg must end the answer
        as interrupted."""

    def feed(self, chunk: bytes) -> bytes:
        """Peer bytes (cut anywhere) in; complete, rewritten events out."""
        if self.broken:
            return b""
        # CRLF line ends become LF (a CR left at the end of a chunk meets its LF in the next one).
        data = (self._tail + chunk).replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            if len(data) > MAX_EVENT:
                self.broken = True
            return b""
        self._tail = data[end + 2:]
        out = []
        for block in data[:end].split(b"\n\n"):
            out.append(self._rewrite(block))
            if self.broken:
                break
        return b"".join(out)

    def finish(self) -> bytes:
        """The peer's stream ended: what is left, and ``[DONE]`` when the peer did not send it (never after a
        malformed event: what follows it was dropped, so the answer is not whole)."""
        if self.broken:
            return b""
        out = self._rewrite(self._tail) if self._tail.strip() else b""
        self._tail = b""
        if not self.done:
            self.done = True
            out += b"data: [DONE]\n\n"
        return out

    def _rewrite(self, block: bytes) -> bytes:
        payload = b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:]
                             for line in block.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:"))
        if not payload:
            return b""  # comments (pings) and blank blocks carry nothing for the client
        if payload.strip() == b"[DONE]":
            if self.done:
                return b""
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            event = json.loads(payload)
        except ValueError:
            self.broken = True
            return b""
        if not isinstance(event, dict):
            return b""
        if "error" in event:
            return _event(event)
        self._identity.apply(event)
        self.events += 1
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if self._chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    if self._role_sent:
                        delta.pop("role", None)
                    self._role_sent = self._role_sent or "role" in delta
                    if isinstance(delta.get("content"), str):
                        self.text.append(delta["content"])
            elif isinstance(choice.get("text"), str):
                self.text.append(choice["text"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        if event.get("usage"):
            event["usage"] = add_usage(event["usage"], self._delivered)
        if self._chat and self._empty(event):
            return b""  # the peer's role-only opening chunk: the client has had one already
        return _event(event)

    @staticmethod
    def _empty(event: dict[str, Any]) -> bool:
        choices = event.get("choices") or []
        return (not event.get("usage") and len(choices) == 1 and isinstance(choices[0], dict)
                and not choices[0].get("finish_reason") and not (choices[0].get("delta") or {}))
