"""One bounded HTTP request to the engine: the metadata helper's deadline and size cap, engine errors."""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx

from spotguard.clouds.fetch import MetadataResponse, request
from spotguard.errors import EngineError, MetadataError

MAX_BODY_BYTES = 1024 * 1024


async def call(http: httpx.AsyncClient, method: str, url: str, *, timeout: float,
               content: bytes | None = None, headers: Mapping[str, str] | None = None,
               max_bytes: int = MAX_BODY_BYTES) -> MetadataResponse:
    """Exactly one request within ``timeout`` seconds. Any status is returned; EngineError when there is
    no usable answer (transport error, timeout, 5xx, a body over ``max_bytes`` or not UTF-8)."""
    if not url:
        raise EngineError(f"{method}: no URL configured (set [server] url)")
    try:
        return await request(http, method, url, timeout=timeout, content=content, headers=headers,
                             max_bytes=max_bytes)
    except MetadataError as exc:
        raise EngineError(f"engine request failed: {exc}") from exc


def expect_ok(response: MetadataResponse, what: str) -> None:
    """EngineError naming the status (and a short excerpt of the engine's answer) unless it is 2xx."""
    if not 200 <= response.status < 300:
        raise EngineError(f"{what}: HTTP {response.status}: {response.text.strip()[:200] or '(empty body)'}")


def parse_json(response: MetadataResponse, what: str) -> object:
    try:
        return json.loads(response.text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"{what}: the answer is not JSON ({exc.msg} at {exc.pos})") from None
