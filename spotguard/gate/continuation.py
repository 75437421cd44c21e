"""The request that continues an answer on another replica: the original request plus the output so far.

One shape for every OpenAI-compatible engine, so the peer can be another node's gate, its engine, or an
internal load balancer (all reached on the OpenAI paths the gate lets through):

- chat: the messages plus an assistant message holding the output so far. vLLM and SGLang are told to
  continue it (``continue_final_message: true, add_generation_prompt: false``); llama-server prefills a
  trailing assistant message by default (ggml-org/llama.cpp PR #13174, opt-out ``--no-prefill-assistant``)
  and also accepts those two flags since PR #23012;
- completions: the prompt plus the output so far;
- ``max_tokens`` / ``max_completion_tokens`` reduced by the tokens already delivered.

What cannot be continued soundly raises ``NotContinuable`` with the reason (the caller ends the client's
answer with a retryable error instead): several choices (``n`` > 1), a tool call already under way, a
token-id or batched prompt, ``echo`` (the peer would repeat the prompt), ``best_of``, no budget left, and
a count or a token limit that is not a plain integer (``2.0``, ``"3"``, ``true``): the engine may read it
otherwise than we would (Python's ``2.0 > 1`` is true, a string is compared as nothing), so the peer could
get several choices or the whole budget again.
"""

from __future__ import annotations

from typing import Any

CONTINUE_FLAGS: dict[str, dict[str, bool]] = {
    "vllm": {"continue_final_message": True, "add_generation_prompt": False},
    "sglang": {"continue_final_message": True, "add_generation_prompt": False},
    "llamacpp": {"continue_final_message": True, "add_generation_prompt": False},
}
"""Per engine kind, the flags that make a trailing assistant message be continued, not answered."""

class NotContinuable(ValueError):
    """This request cannot be continued elsewhere; the message says why (for logs and metrics)."""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise NotContinuable("a token-id or batched prompt")


COUNTED_KEYS = ("n", "best_of", "max_completion_tokens", "max_tokens", "n_predict")
"""Keys whose value must be a plain integer (or absent, or null) for a continuation to be sound."""


def _integer(body: dict[str, Any], key: str) -> int | None:
    """``body[key]`` as a plain integer; None when absent or null; NotContinuable for anything else."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotContinuable(f"a count or token limit that is not an integer ({key})")
    return value


def remaining_budget(body: dict[str, Any], delivered: int) -> dict[str, int]:
    """The token limits of ``body`` less what was delivered; {} when it set none."""
    limits: dict[str, int] = {}
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        value = _integer(body, key)
        if value is not None and value >= 0:
            left = value - delivered
            if left <= 0:
                raise NotContinuable("no token budget left")
            limits[key] = left
    return limits


def continuation_body(body: dict[str, Any], *, chat: bool, output: str, delivered: int,
                      engine: str = "openai", tool_call_started: bool = False) -> dict[str, Any]:
    """The body to send to the same path on the peer; ``delivered`` is the tokens the client already has."""
    for key in COUNTED_KEYS:
        _integer(body, key)
    if (_integer(body, "n") or 1) > 1:
        raise NotContinuable("several choices (n > 1)")
    if tool_call_started:
        raise NotContinuable("a tool call was being streamed")
    if body.get("echo") or (_integer(body, "best_of") or 1) > 1:
        raise NotContinuable("echo or best_of")
    follow = dict(body)
    follow.update(remaining_budget(body, delivered))
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise NotContinuable("the chat request has no messages list")
        if output:
            last = messages[-1] if messages else None
            if (body.get("continue_final_message") is True and isinstance(last, dict)
                    and last.get("role") == "assistant" and isinstance(last.get("content"), str)):
                # Already continuing an assistant message (a continuation of a continuation, or a request
                # that prefills the answer): the output so far extends it.
                follow["messages"] = [*messages[:-1], {**last, "content": last["content"] + output}]
            else:
                follow["messages"] = [*messages, {"role": "assistant", "content": output}]
            follow.update(CONTINUE_FLAGS.get(engine, {}))
    else:
        follow["prompt"] = _prompt_text(body.get("prompt")) + output
    return follow


def continuable(body: dict[str, Any], *, chat: bool) -> bool:
    """The request itself allows a continuation elsewhere (what its answer so far will say is not known yet)."""
    try:
        continuation_body(body, chat=chat, output="", delivered=0)
    except NotContinuable:
        return False
    return True
