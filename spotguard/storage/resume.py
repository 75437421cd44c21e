"""Resume a snapshot's requests on another OpenAI-compatible server, where each one stopped.

Completions: the prompt becomes prompt + output so far. Chat: the output so far is appended as an
assistant message to continue (``engine="vllm"`` adds vLLM's ``continue_final_message``); for
llama.cpp the chat is rendered with the target's own template (``/apply-template``) and continued
as a raw completion, which works whether or not the server supports assistant prefill. Where the
snapshot holds a llama.cpp slot file for the request and ``slot_dir`` (the target's
--slot-save-path) is given, the file is restored into a slot first and the continuation is sent
with ``id_slot`` and ``cache_prompt: true``, so the target skips the prefill.

Prompts and outputs are user data: they are returned, never logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx

from spotguard.errors import EngineError, SpotguardError, StoreError
from spotguard.storage import crypto, llamacpp
from spotguard.storage.format import ContinuationRecord, safe_segment
from spotguard.storage.reader import Snapshot, open_snapshot
from spotguard.storage.store import StoreOptions

Engine = Literal["openai", "vllm", "llamacpp"]

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty", "presence_penalty",
             "frequency_penalty")


@dataclass(frozen=True)
class ResumeResult:
    id: str
    ok: bool
    text: str = ""
    """What the target produced after the saved output."""
    kv_restored: bool = False
    cache_n: int | None = None
    """Prompt tokens the target took from its cache (llama.cpp timings.cache_n / tokens_cached)."""
    error: str = ""


@dataclass(frozen=True)
class Continuation:
    path: str
    body: dict[str, Any]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise StoreError("only a single text prompt can be continued (token-id or batched prompts cannot)")


def _is_chat(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def _limit(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        if isinstance(body.get(key), int):
            return int(body[key])
    return None


async def continuation(record: ContinuationRecord, engine: Engine, *, http: httpx.AsyncClient, to_url: str,
                       slot: int | None = None, timeout: float = 30.0, max_tokens: int | None = None) -> Continuation:
    """The request that continues ``record`` on the target; ``max_tokens`` caps what it may add."""
    try:
        body = json.loads(record.body_bytes())
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"record {record.id}: request body is not JSON") from None
    if not isinstance(body, dict):
        raise StoreError(f"record {record.id}: request body is not a JSON object")
    chat = _is_chat(record.endpoint)
    if engine == "llamacpp":
        if chat:
            messages = body.get("messages")
            response = await http.post(f"{to_url}/apply-template", json={"messages": messages}, timeout=timeout)
            if response.status_code != 200 or not isinstance(response.json().get("prompt"), str):
                raise EngineError(f"record {record.id}: /apply-template answered HTTP {response.status_code}")
            prompt = response.json()["prompt"]
        else:
            prompt = _prompt_text(body.get("prompt"))
        native: dict[str, Any] = {k: body[k] for k in _SAMPLING if k in body}
        limit = _limit(body) if max_tokens is None else max_tokens
        native.update(prompt=prompt + record.output, n_predict=-1 if limit is None else limit, stream=False,
                      cache_prompt=True)
        if slot is not None:
            native["id_slot"] = slot
        return Continuation("/completion", native)
    body = {**body, "stream": False}
    body.pop("stream_options", None)
    if max_tokens is not None:
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
    if chat:
        messages = list(body.get("messages") or [])
        messages.append({"role": "assistant", "content": record.output})
        body["messages"] = messages
        if engine == "vllm":
            body.update(continue_final_message=True, add_generation_prompt=False)
        return Continuation(record.endpoint, body)
    body["prompt"] = _prompt_text(body.get("prompt")) + record.output
    return Continuation(record.endpoint, body)


def _answer(data: Any) -> tuple[str, int | None]:
    if not isinstance(data, dict):
        raise EngineError("answer is not a JSON object")
    cache: int | None = None
    timings = data.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        cache = timings["cache_n"]
    elif isinstance(data.get("tokens_cached"), int):
        cache = data["tokens_cached"]
    if isinstance(data.get("content"), str):
        return data["content"], cache
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        if isinstance(first.get("text"), str):
            return first["text"], cache
        message = first.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message["content"], cache
    raise EngineError("answer has no completion text")


async def _restore_slots(snapshot: Snapshot, http: httpx.AsyncClient, to_url: str, slot_dir: str,
                         model_sha256: str, timeout: float) -> tuple[dict[str, int], dict[str, str]]:
    """Restore each request's slot file into its own target slot: request id -> slot, request id -> why not."""
    placed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    engine = snapshot.manifest.engine
    # Slot files whose request is unknown are restored too: sent without id_slot, the continuation
    # lands on the slot whose cached prompt is most similar (llama-server's slot selection).
    kv = sorted((e for e in snapshot.manifest.objects if e.kind == "kv"), key=lambda e: not e.request_ids)
    if not kv or engine is None:
        return placed, skipped
    if model_sha256 and engine.model_sha256 and model_sha256 != engine.model_sha256:
        return placed, {e.name: "the target's model differs from the snapshot's" for e in kv}
    props = await llamacpp.props(http, to_url, timeout=timeout)
    for index, entry in enumerate(kv):
        owner = entry.request_ids[0] if entry.request_ids else f"unmapped-{entry.slot_id}"
        if index >= props.total_slots:
            skipped[owner] = "no free slot on the target"
            continue
        if props.n_ctx and entry.tokens > props.n_ctx:
            skipped[owner] = f"{entry.tokens} tokens do not fit the target's n_ctx {props.n_ctx}"
            continue
        filename = f"resume-{safe_segment(snapshot.manifest.event_id)[:40]}-{index}.bin"
        try:
            data = await snapshot.read(entry.name)
            await anyio.to_thread.run_sync(Path(slot_dir, filename).write_bytes, data)
            await llamacpp.restore(http, to_url, index, filename, timeout=timeout)
            placed[owner] = index
        except (SpotguardError, OSError) as exc:
            skipped[owner] = str(exc)
    return placed, skipped


async def resume(snapshot_url: str, to_url: str, *, engine: Engine = "openai", slot_dir: str | None = None,
                 options: StoreOptions | None = None, key: crypto.Key | None = None, model_sha256: str = "",
                 max_tokens: int | None = None, timeout: float = 120.0) -> list[ResumeResult]:
    """Replay every record of the snapshot to ``to_url``; one result per record, in record order."""
    snapshot = await open_snapshot(snapshot_url, options, key=key)
    records = await snapshot.records()
    to_url = to_url.rstrip("/")
    results: list[ResumeResult] = []
    async with httpx.AsyncClient() as http:
        placed: dict[str, int] = {}
        if engine == "llamacpp" and slot_dir:
            placed, _ = await _restore_slots(snapshot, http, to_url, slot_dir, model_sha256, timeout)
        for record in records:
            if record.finish_reason is not None:
                results.append(ResumeResult(record.id, True))  # it had already finished
                continue
            slot = placed.get(record.id)
            try:
                with anyio.fail_after(timeout):
                    request = await continuation(record, engine, http=http, to_url=to_url, slot=slot, timeout=timeout,
                                                 max_tokens=max_tokens)
                    response = await http.post(f"{to_url}{request.path}", json=request.body, timeout=timeout)
                if response.status_code != 200:
                    raise EngineError(f"HTTP {response.status_code} from {request.path}")
                text, cache = _answer(response.json())
                results.append(ResumeResult(record.id, True, text, slot is not None, cache))
            except TimeoutError:
                results.append(ResumeResult(record.id, False, error=f"no answer within {timeout:.0f}s"))
            except (SpotguardError, httpx.HTTPError, ValueError) as exc:
                results.append(ResumeResult(record.id, False, kv_restored=slot is not None, error=str(exc)))
    return results
