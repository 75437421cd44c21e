"""Non-streaming answers built from a stream, so that their output so far is always known.

A non-streaming request to the engine gives nothing until the whole answer is there: cut it at an
eviction and there is nothing to continue from, so a retry pays the whole generation again. With peers or
resume configured, the gate asks the engine for the same answer as a stream (``streaming_body``), reads
it as it comes, and gives the client the one JSON answer it asked for (``answer_json``). Only requests
whose answer the stream carries whole are rewritten (``streamable``): one choice, no tools, no
log-probabilities, no echo; anything else goes to the engine unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from spotguard.gate.stitch import AnswerIdentity

NOT_STREAMABLE = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "echo", "prompt_logprobs",
                  "stream_options", "suffix")
"""Request fields whose effect a stream does not carry whole (or that already shape one)."""


def streamable(body: dict[str, Any]) -> bool:
    """A non-streaming request whose whole answer a stream carries: it may be asked for as one."""
    if body.get("stream") is True:
        return False
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or value != 1):
            return False
    return not any(body.get(key) not in (None, False, 0, [], {}) for key in NOT_STREAMABLE)


def streaming_body(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asked for as a stream, with the token counts in its last event."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def answer_json(*, chat: bool, identity: AnswerIdentity | None, text: str, finish_reason: str | None,
                usage: dict[str, Any] | None, fingerprint: str | None = None) -> bytes:
    """The OpenAI non-streaming answer (chat.completion or text_completion) for what a stream said."""
    ident = identity or AnswerIdentity()
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    answer: dict[str, Any] = {"id": ident.id or "", "object": "chat.completion" if chat else "text_completion",
                              "created": ident.created or 0, "model": ident.model or "", "choices": [choice]}
    if fingerprint is not None:
        answer["system_fingerprint"] = fingerprint
    if usage is not None:
        answer["usage"] = usage
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
