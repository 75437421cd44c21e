"""llama.cpp ``llama-server``: its slot API (the one client of ``/slots`` and ``/props``) and its adapter.

The adapter never signals llama-server: SIGTERM stops it at once and loses running requests. New work is
kept away by the drain's readiness step (the gate, when one is set, answers 503 from then on) and the
load balancer; the server keeps running so its slots can finish or be saved.

``POST /slots/{id}?action=save`` waits while the slot is busy, so callers cut the request first (the
gate's journal) and bound the wait with their own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from spotguard.errors import EngineError
from spotguard.servers.call import call, expect_ok, parse_json


@dataclass(frozen=True)
class SlotInfo:
    id: int
    is_processing: bool
    tokens: int
    """Prompt tokens plus tokens decoded so far (0 where the build does not report them)."""


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


def parse_slots(payload: object, source: str) -> list[SlotInfo]:
    """``/slots`` entries; a slot is busy when ``is_processing`` (or ``state`` != 0 on older builds)."""
    if not isinstance(payload, list):
        raise EngineError(f"{source}: expected a JSON list of slots, got {type(payload).__name__}")
    found = []
    for slot in payload:
        if not isinstance(slot, dict):
            raise EngineError(f"{source}: a slot is {type(slot).__name__}, not an object")
        flag = slot.get("is_processing", None)
        if flag is None and "state" in slot:
            flag = slot["state"] != 0
        if not isinstance(flag, bool):
            raise EngineError(f"{source}: slot {slot.get('id', '?')} has no is_processing flag")
        if not isinstance(slot.get("id"), int):
            raise EngineError(f"{source}: a slot has no integer id")
        decoded = 0
        for nxt in slot.get("next_token") or []:
            if isinstance(nxt, dict) and isinstance(nxt.get("n_decoded"), int):
                decoded = nxt["n_decoded"]
        prompt = slot.get("n_prompt_tokens")
        found.append(SlotInfo(slot["id"], flag, (prompt if isinstance(prompt, int) else 0) + decoded))
    return found


@dataclass(frozen=True)
class SlotApi:
    """llama-server's slot API at ``url``: which slots are busy, the server's settings, save and restore."""

    http: httpx.AsyncClient
    url: str

    async def _json(self, method: str, path: str, *, timeout: float, body: object = None) -> object:
        url = f"{self.url.rstrip('/')}{path}"
        response = await call(self.http, method, url, timeout=timeout, json_body=body)
        if response.status == 501 and path == "/slots":
            raise EngineError(f"GET {url}: 501, the slots endpoint is off (llama-server started with --no-slots?)")
        expect_ok(response, f"{method} {url}")
        return parse_json(response, f"{method} {url}")

    async def slots(self, *, timeout: float) -> list[SlotInfo]:
        return parse_slots(await self._json("GET", "/slots", timeout=timeout), f"GET {self.url}/slots")

    async def props(self, *, timeout: float) -> Props:
        data = await self._json("GET", "/props", timeout=timeout)
        if not isinstance(data, dict):
            raise EngineError("GET /props: expected a JSON object")
        settings = data.get("default_generation_settings") or {}
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        return Props(n_ctx=n_ctx if isinstance(n_ctx, int) else 0, total_slots=int(data.get("total_slots") or 0),
                     model_path=str(data.get("model_path") or ""), build_info=str(data.get("build_info") or ""))

    async def save(self, slot_id: int, filename: str, *, timeout: float) -> SavedSlot:
        """Write the slot's KV cache to ``filename`` in the server's --slot-save-path."""
        data = await self._json("POST", f"/slots/{slot_id}?action=save", body={"filename": filename},
                                timeout=timeout)
        if not isinstance(data, dict) or not isinstance(data.get("n_written"), int):
            raise EngineError(f"slot {slot_id} save: unexpected answer")
        return SavedSlot(slot_id, filename, int(data.get("n_saved") or 0), int(data["n_written"]))

    async def restore(self, slot_id: int, filename: str, *, timeout: float) -> int:
        """Load a slot file (already in the server's --slot-save-path) into ``slot_id``; returns tokens restored."""
        data = await self._json("POST", f"/slots/{slot_id}?action=restore", body={"filename": filename},
                                timeout=timeout)
        if not isinstance(data, dict):
            raise EngineError(f"slot {slot_id} restore: unexpected answer")
        return int(data.get("n_restored") or 0)


def slot_file(directory: str, filename: str) -> Path:
    return Path(directory) / filename


class LlamaCppAdapter:
    name = "llamacpp"

    def __init__(self, *, http: httpx.AsyncClient, url: str, timeout: float) -> None:
        self.api = SlotApi(http, url)
        self.timeout = timeout

    async def stop_accepting(self, *, dry_run: bool) -> str:
        verb = "would leave" if dry_run else "left"
        return (f"llama-server not signalled (SIGTERM would abort running requests): {verb} it serving the "
                "requests in flight; readiness, the gate and the load balancer keep new work away")

    async def resume_accepting(self, *, dry_run: bool) -> str:
        # stop_accepting did nothing to the server; undrain reopens readiness and the gate itself.
        return "llama-server was never signalled: nothing to restart (the gate takes new requests again)"

    async def inflight(self) -> int:
        # Requests queued inside llama-server hold no slot yet; the drain also reads the gate's journal.
        return sum(slot.is_processing for slot in await self.api.slots(timeout=self.timeout))
