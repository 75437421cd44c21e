"""llama.cpp ``llama-server``: no drain of its own, so it is never signalled; in-flight from ``/slots``.

SIGTERM stops llama-server at once and loses running requests, so stopping new work is the gate's job:
the adapter switches the gate to draining (readiness was already failed by the drain's readiness
step) and leaves the server running so its slots can finish or be saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from spotguard.errors import EngineError, GateError
from spotguard.servers.call import call, expect_ok, parse_json

if TYPE_CHECKING:
    from spotguard.gate.journal import JournalAccess


def busy_slots(payload: object, source: str) -> int:
    """How many ``/slots`` entries are processing (``is_processing``, or ``state`` != 0 on older builds)."""
    if not isinstance(payload, list):
        raise EngineError(f"{source}: expected a JSON list of slots, got {type(payload).__name__}")
    busy = 0
    for slot in payload:
        if not isinstance(slot, dict):
            raise EngineError(f"{source}: a slot is {type(slot).__name__}, not an object")
        flag = slot.get("is_processing", None)
        if flag is None and "state" in slot:
            flag = slot["state"] != 0
        if not isinstance(flag, bool):
            raise EngineError(f"{source}: slot {slot.get('id', '?')} has no is_processing flag")
        busy += flag
    return busy


class LlamaCppAdapter:
    name = "llamacpp"

    def __init__(self, *, http: httpx.AsyncClient, url: str, timeout: float, journal: JournalAccess | None = None,
                 set_gate_draining: Callable[[], None] | None = None) -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.journal = journal
        self.set_gate_draining = set_gate_draining

    async def stop_accepting(self, *, dry_run: bool) -> str:
        why = "llama-server not signalled (SIGTERM would abort running requests)"
        if self.set_gate_draining is None:
            return (f"{why}; no gate in front of it, so only readiness and the load balancer keep new work "
                    "away")
        if dry_run:
            return f"{why}; would switch the gate to draining"
        self.set_gate_draining()
        return f"{why}; gate switched to draining (new requests get 503)"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        # stop_accepting only switched the gate; undrain reopens the gate itself.
        return "llama-server was never signalled: nothing to restart (the gate takes new requests again)"

    async def inflight(self) -> int | None:
        url = f"{self.url}/slots"
        response = await call(self.http, "GET", url, timeout=self.timeout)
        if response.status == 501:
            raise EngineError(f"GET {url}: 501, the slots endpoint is off (llama-server started with "
                              "--no-slots?)")
        expect_ok(response, f"GET {url}")
        busy = busy_slots(parse_json(response, f"GET {url}"), f"GET {url}")
        # Requests queued inside llama-server hold no slot yet; the gate's journal still sees them.
        if self.journal is None:
            return busy
        try:
            return max(busy, await self.journal.count())
        except GateError:
            return busy
