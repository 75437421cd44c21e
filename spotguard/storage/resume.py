"""Resume a snapshot's requests on another OpenAI-compatible server, where each one stopped.

Completions: the prompt becomes prompt + output so far. Chat: the output so far is appended as an
assistant message to continue (``engine="vllm"`` adds vLLM's ``continue_final_message``); for
llama.cpp the chat is rendered with the target's own template (``/apply-template``) and continued
as a raw completion, which works whether or not the server supports assistant prefill. Where the
snapshot holds a llama.cpp slot file for the request and ``slot_dir`` (the target's
--slot-save-path) is given, the file is restored into a slot first and the continuation is sent
with ``id_slot`` and ``cache_prompt: true``, so the target skips the prefill.

A snapshot is hostile input: only records whose endpoint is one the gate journals are sent, every
request goes to ``to_url`` and nowhere else (the path comes from a fixed list, never from the record),
a bad record is reported as a failed result, and slot files are restored only when the target's model
hash is known and equals the snapshot's.

Prompts and outputs are user data: they are returned, never logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import httpx

from spotguard.errors import ConfigError, EngineError, SpotguardError, StoreError
from spotguard.servers.llamacpp import SlotApi
from spotguard.storage import crypto
from spotguard.storage.format import RECORD_ENDPOINTS, BadRecord, ContinuationRecord, safe_segment
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
    kv_note: str = ""
    """Why a slot file for this request was not restored, when there was one."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "text": self.text, "kv_restored": self.kv_restored,
                "cache_n": self.cache_n, "error": self.error, "kv_note": self.kv_note}


@dataclass(frozen=True)
class Continuation:
    path: str
    """One of TARGET_PATHS: never taken from the record."""
    body: dict[str, Any]


TARGET_PATHS = (*RECORD_ENDPOINTS, "/completion", "/apply-template")
"""Every path resume ever sends to; each is appended to ``--to``'s own path."""


def target_base(to_url: str) -> str:
    """``to_url`` checked (http(s), a host, no credentials, query or fragment) and without a trailing /."""
    parts = urlsplit(to_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--to: expected http(s)://host[:port], got {to_url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("--to: no credentials, query or fragment in the URL")
    return to_url.rstrip("/")


def _url(base: str, path: str) -> str:
    """The one way a request URL is built: ``base`` + a fixed path, so a record cannot choose the host."""
    if path not in TARGET_PATHS:
        raise StoreError(f"refusing to send to {path!r}: not one of {', '.join(TARGET_PATHS)}")
    return base + path


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
    if record.endpoint not in RECORD_ENDPOINTS:  # from_json refuses these already; never trust one here
        raise StoreError(f"record {record.id}: endpoint {record.endpoint!r} is not one of {', '.join(RECORD_ENDPOINTS)}")
    chat = _is_chat(record.endpoint)
    if engine == "llamacpp":
        if chat:
            messages = body.get("messages")
            response = await http.post(_url(to_url, "/apply-template"), json={"messages": messages},
                                       timeout=timeout)
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


def _owner(entry: Any) -> str:
    return str(entry.request_ids[0]) if entry.request_ids else f"unmapped-{entry.slot_id}"


async def _restore_slots(snapshot: Snapshot, http: httpx.AsyncClient, to_url: str, slot_dir: str,
                         model_sha256: str, timeout: float) -> tuple[dict[str, int], dict[str, str]]:
    """Restore each request's slot file into its own target slot: request id -> slot, request id -> why not."""
    placed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    engine = snapshot.manifest.engine
    # Slot files whose request is unknown are restored too: sent without id_slot, the continuation
    # lands on the slot whose cached prompt is most similar (llama-server's slot selection).
    kv = sorted((e for e in snapshot.manifest.objects if e.kind == "kv"), key=lambda e: not e.request_ids)
    if not kv:
        return placed, skipped
    # A slot file restored under another model gives garbage: restore only when both hashes are known.
    why = ("the snapshot names no engine" if engine is None
           else "the snapshot does not record its model's sha256" if not engine.model_sha256
           else "the target's model sha256 is unknown (pass --model or --model-sha256)" if not model_sha256
           else "the target's model differs from the snapshot's" if model_sha256 != engine.model_sha256
           else "")
    if why:  # "*": the reason holds for every record, also those whose slot file is not tied to them
        return placed, {**{_owner(e): why for e in kv}, "*": why}
    api = SlotApi(http, to_url)
    props = await api.props(timeout=timeout)
    for index, entry in enumerate(kv):
        owner = _owner(entry)
        if index >= props.total_slots:
            skipped[owner] = "no free slot on the target"
            continue
        if props.n_ctx and entry.tokens > props.n_ctx:
            skipped[owner] = f"{entry.tokens} tokens do not fit the target's n_ctx {props.n_ctx}"
            continue
        filename = f"resume-{safe_segment(snapshot.manifest.event_id)[:40]}-{index}.bin"
        try:
            # Streamed to disk and published only once its hash and every frame checked out.
            await snapshot.save(entry.name, Path(slot_dir), filename)
            await api.restore(index, filename, timeout=timeout)
            placed[owner] = index
        except (SpotguardError, OSError) as exc:
            skipped[owner] = str(exc)
    return placed, skipped


async def resume(snapshot_url: str, to_url: str, *, engine: Engine = "openai", slot_dir: str | None = None,
                 options: StoreOptions | None = None, key: crypto.Key | None = None, model_sha256: str = "",
                 max_tokens: int | None = None, timeout: float = 120.0,
                 allow_unauthenticated: bool = False,
                 opened: Callable[[Snapshot], None] | None = None) -> list[ResumeResult]:
    """Replay every record of the snapshot to ``to_url``; one result per record, in record order.

    ``opened`` is called with the snapshot once its manifest checked out (the CLI says whether it was
    authenticated).
    """
    to_url = target_base(to_url)
    snapshot = await open_snapshot(snapshot_url, options, key=key, allow_unauthenticated=allow_unauthenticated)
    if opened is not None:
        opened(snapshot)
    records = await snapshot.read_records()
    results: list[ResumeResult] = []
    # No redirects and no proxies from the environment: the requests go to --to and nowhere else.
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as http:
        placed: dict[str, int] = {}
        skipped: dict[str, str] = {}
        if engine == "llamacpp" and slot_dir:
            placed, skipped = await _restore_slots(snapshot, http, to_url, slot_dir, model_sha256, timeout)
        for record in records:
            if isinstance(record, BadRecord):
                results.append(ResumeResult(record.id, False, error=f"bad record ({record.source} line "
                                                                    f"{record.line}): {record.error}"))
                continue
            note = skipped.get(record.id, skipped.get("*", ""))
            if record.finish_reason is not None:
                results.append(ResumeResult(record.id, True))  # it had already finished
                continue
            if record.migrated_to:  # the gate continued it on a peer: the client had its answer from there
                results.append(ResumeResult(record.id, True, kv_note=f"migrated to {record.migrated_to}"))
                continue
            slot = placed.get(record.id)
            try:
                with anyio.fail_after(timeout):
                    request = await continuation(record, engine, http=http, to_url=to_url, slot=slot, timeout=timeout,
                                                 max_tokens=max_tokens)
                    response = await http.post(_url(to_url, request.path), json=request.body, timeout=timeout)
                if response.status_code != 200:
                    raise EngineError(f"HTTP {response.status_code} from {request.path}")
                text, cache = _answer(response.json())
                results.append(ResumeResult(record.id, True, text, slot is not None, cache, kv_note=note))
            except TimeoutError:
                results.append(ResumeResult(record.id, False, error=f"no answer within {timeout:.0f}s", kv_note=note))
            except (SpotguardError, httpx.HTTPError, ValueError) as exc:
                results.append(ResumeResult(record.id, False, kv_restored=slot is not None, error=str(exc),
                                            kv_note=note))
    return results
