"""Reading the engine's answer as it goes: SSE deltas as they stream, or the final JSON body.

OpenAI-compatible shapes only, first choice only (``n > 1`` keeps choice 0):

- chat: stream ``choices[0].delta.content``, final ``choices[0].message.content``;
- completions: ``choices[0].text`` in both.

``finish_reason`` is kept when the engine sends one. The llama.cpp slot (``slot_id``) is known when the
request pins one (``"id_slot": N`` in its body); otherwise llama.cpp (0.3.36's server) reports it only in
``__verbose`` of the final answer, when the client asked ``"verbose": true`` (stream chunks before the
last carry -1). The gate never rewrites a request to ask for it.

Parsing must never break the proxy: anything unexpected is counted in ``errors`` and the bytes are
still passed through untouched by the caller.
"""

from __future__ import annotations

import json
from typing import Any

from spotguard.gate.stitch import AnswerIdentity

MAX_PENDING = 1 << 20
"""Bytes of an unfinished SSE line kept before giving up on parsing this stream (no newline = not SSE)."""

BATCH_BYTES = 32 << 10
"""Stream bytes held before they are parsed (see ``OutputParser``): the most the parsed output lags
behind, in bytes, until someone reads it (``flush``)."""

_DONE = b"[DONE]"


class OutputParser:
    """SSE parser that collects one answer's output deltas, in batches.

    ``feed`` only keeps the bytes (the gate calls it for every chunk it relays); they are parsed once
    ``BATCH_BYTES`` have piled up, or when the output is about to be read (``flush``: the gate calls it
    before it reports a request), or at the end (``finish``). Parsing a batch costs one ``json.loads``
    for all its events instead of one per event.
    """

    __slots__ = ("_chat", "_tail", "_data", "_broken", "_pending", "_size", "errors", "output",
                 "finish_reason", "slot_id", "identity", "role_sent", "content_events", "tool_call_started",
                 "usage", "fingerprint")

    def __init__(self, *, chat: bool, slot_id: int | None = None) -> None:
        self._chat = chat
        self._tail = b""
        self._data: list[bytes] = []
        self._broken = False
        self._pending: list[bytes] = []
        self._size = 0
        self.errors = 0
        self.output: list[str] = []
        """The text so far, in the pieces the engine sent."""
        self.finish_reason: str | None = None
        self.slot_id = slot_id
        """The llama.cpp slot serving the request: pinned by the request, or reported in ``__verbose``."""
        # What a migration needs to join a peer's answer onto this one (see stitch.py):
        self.identity: AnswerIdentity | None = None
        """``id``, ``model``, ``created``, ``object`` of the first event the client got."""
        self.role_sent = False
        self.content_events = 0
        """Events that carried text: the tokens delivered, where the engine streams one per event."""
        self.tool_call_started = False
        self.usage: dict[str, Any] | None = None
        """The engine's token counts (the last event carrying them), where it sent them."""
        self.fingerprint: str | None = None
        """``system_fingerprint``, where the engine sends one."""

    def feed(self, chunk: bytes) -> None:
        """One chunk of the raw SSE stream, cut anywhere."""
        if self._broken:
            return
        self._pending.append(chunk)
        self._size += len(chunk)
        if self._size >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Parse what has been fed so far (complete lines; an unfinished one waits for its end)."""
        pending = self._pending
        if not pending:
            return
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._size = 0
        if self._broken:
            return
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(b"\n")
        self._tail = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                # One leading space is part of the field syntax, not of the value.
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            # event:, id:, retry: and ":" comments (llama.cpp pings) carry no output.
        if len(self._tail) > MAX_PENDING:
            self._broken = True
            self.errors += 1
            self._tail = b""
        self._dispatch(events)

    def finish(self) -> None:
        """The stream ended: an event left without its blank line is still taken."""
        self.flush()
        if self._tail and not self._broken:
            self._pending.append(b"\n\n")  # ends the last line and its event
            self.flush()
        elif self._data:
            self._pending.append(b"\n")
            self.flush()
        self._tail = b""

    def _dispatch(self, events: list[bytes]) -> None:
        events = [e for e in events if e != _DONE]
        if not events:
            return
        if len(events) > 1:
            try:
                parsed = json.loads(b"[" + b",".join(events) + b"]")
            except ValueError:
                parsed = None
            # One payload that is itself a comma list ("1, 2") would shift the rest: parse one by one then.
            if isinstance(parsed, list) and len(parsed) == len(events):
                for event in parsed:
                    self._take_safe(event)
                return
        for raw in events:
            try:
                event = json.loads(raw)
            except ValueError:
                self.errors += 1
                continue
            self._take_safe(event)

    def _take_safe(self, event: Any) -> None:
        try:
            self._take(event, final=False)
        except (TypeError, AttributeError, IndexError, KeyError):
            self.errors += 1

    def parse_body(self, body: bytes) -> None:
        """The whole non-streaming answer (a JSON object)."""
        try:
            self._take(json.loads(body), final=True)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError):
            self.errors += 1

    @property
    def text(self) -> str:
        """The output parsed so far (call ``flush`` first for everything fed)."""
        return "".join(self.output)

    def _take(self, event: Any, *, final: bool) -> None:
        if self.identity is None and isinstance(event, dict) and "error" not in event:
            self.identity = AnswerIdentity.of(event)
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        fingerprint = event.get("system_fingerprint")
        if isinstance(fingerprint, str):
            self.fingerprint = fingerprint
        choices = event.get("choices")
        if choices:
            choice = choices[0]
            if self._chat:
                part = choice.get("message" if final else "delta")
                text = part.get("content") if part else None
                if part:
                    self.role_sent = self.role_sent or "role" in part
                    self.tool_call_started = self.tool_call_started or bool(part.get("tool_calls"))
            else:
                text = choice.get("text")
            if text:
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
                self.output.append(text)
                self.content_events += 1
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reason = str(reason)
        elif "error" not in event and "choices" not in event:
            raise KeyError("no choices")
        verbose = event.get("__verbose")
        if verbose:
            slot = verbose.get("id_slot")
            if isinstance(slot, int) and slot >= 0:  # llama.cpp sends -1 in chunks before the last
                self.slot_id = slot


def request_meta(body: bytes) -> tuple[str, bool, int | None] | None:
    """(model, stream, id_slot) of a chat/completions request body; None when it is not a JSON object."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    return meta_of(request)


def meta_of(request: Any) -> tuple[str, bool, int | None] | None:
    """``request_meta`` of a body already parsed."""
    if not isinstance(request, dict):
        return None
    model = request.get("model")
    slot = request.get("id_slot")
    return (model if isinstance(model, str) else "",
            request.get("stream") is True,
            slot if isinstance(slot, int) and slot >= 0 else None)
