"""llama-server's slot API: which slots are busy, save a slot's KV cache to a file, restore it.

``POST /slots/{id}?action=save`` waits while the slot is busy, so callers cut the request first
(``journal.interrupt_all()``) and bound the wait with their own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from spotguard.errors import EngineError


@dataclass(frozen=True)
class SlotInfo:
    id: int
    is_processing: bool
    tokens: int


@dataclass(frozen=True)
class SavedSlot:
    slot_id: int
    filename: str
    tokens: int
    bytes: int


@dataclass(frozen=True)
class Props:
    n_ctx: int
    total_slots: int
    model_path: str
    build_info: str


async def _json(http: httpx.AsyncClient, method: str, url: str, *, body: dict[str, Any] | None = None,
                timeout: float) -> Any:
    try:
        response = await http.request(method, url, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise EngineError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise EngineError(f"{method} {url}: HTTP {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError:
        raise EngineError(f"{method} {url}: answer is not JSON") from None


async def slots(http: httpx.AsyncClient, base_url: str, *, timeout: float = 2.0) -> list[SlotInfo]:
    data = await _json(http, "GET", f"{base_url.rstrip('/')}/slots", timeout=timeout)
    if not isinstance(data, list):
        raise EngineError("GET /slots: expected a JSON list")
    found = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("id"), int):
            decoded = 0
            for nxt in item.get("next_token") or []:
                if isinstance(nxt, dict) and isinstance(nxt.get("n_decoded"), int):
                    decoded = nxt["n_decoded"]
            prompt = item.get("n_prompt_tokens")
            found.append(SlotInfo(item["id"], bool(item.get("is_processing")),
                                  (prompt if isinstance(prompt, int) else 0) + decoded))
    return found


async def props(http: httpx.AsyncClient, base_url: str, *, timeout: float = 2.0) -> Props:
    data = await _json(http, "GET", f"{base_url.rstrip('/')}/props", timeout=timeout)
    if not isinstance(data, dict):
        raise EngineError("GET /props: expected a JSON object")
    settings = data.get("default_generation_settings") or {}
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return Props(n_ctx=n_ctx if isinstance(n_ctx, int) else 0,
                 total_slots=int(data.get("total_slots") or 0),
                 model_path=str(data.get("model_path") or ""), build_info=str(data.get("build_info") or ""))


async def save(http: httpx.AsyncClient, base_url: str, slot_id: int, filename: str, *, timeout: float) -> SavedSlot:
    data = await _json(http, "POST", f"{base_url.rstrip('/')}/slots/{slot_id}?action=save",
                       body={"filename": filename}, timeout=timeout)
    if not isinstance(data, dict) or not isinstance(data.get("n_written"), int):
        raise EngineError(f"slot {slot_id} save: unexpected answer")
    return SavedSlot(slot_id, filename, int(data.get("n_saved") or 0), int(data["n_written"]))


async def restore(http: httpx.AsyncClient, base_url: str, slot_id: int, filename: str, *, timeout: float) -> int:
    """Load a slot file (already in the server's --slot-save-path) into ``slot_id``; returns tokens restored."""
    data = await _json(http, "POST", f"{base_url.rstrip('/')}/slots/{slot_id}?action=restore",
                       body={"filename": filename}, timeout=timeout)
    if not isinstance(data, dict):
        raise EngineError(f"slot {slot_id} restore: unexpected answer")
    return int(data.get("n_restored") or 0)


def slot_file(directory: str, filename: str) -> Path:
    return Path(directory) / filename
