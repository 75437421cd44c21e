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
token-id or batched prompt, ``echo`` (the peer would repeat the prompt), ``best_of``, no budget left.
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


def remaining_budget(body: dict[str, Any], delivered: int) -> dict[str, int]:
    """The token limits of ``body`` less what was delivered; {} when it set none."""
    limits: dict[str, int] = {}
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            left = value - delivered
            if left <= 0:
                raise NotContinuable("no token budget left")
            limits[key] = left
    return limits


def continuation_body(body: dict[str, Any], *, chat: bool, output: str, delivered: int,
                      engine: str = "openai", tool_call_started: bool = False) -> dict[str, Any]:
    """The body to send to the same path on the peer; ``delivered`` is the tokens the client already has."""
    n = body.get("n", 1)
    if isinstance(n, int) and n > 1:
        raise NotContinuable("several choices (n > 1)")
    if tool_call_started:
        raise NotContinuable("a tool call was being streamed")
    if body.get("echo") or (isinstance(body.get("best_of"), int) and body["best_of"] > 1):
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
