"""One bounded HTTP request to the engine: a hard deadline, a size cap, and ``EngineError`` for no answer.

Engines get their own helper rather than the metadata one (``clouds/fetch.py``): an engine that answers
503 has answered (it is loading, or draining), which its adapter interprets; a metadata 503 means "retry".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import httpx

from spotguard.errors import EngineError

MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EngineResponse:
    status: int
    text: str


async def call(http: httpx.AsyncClient, method: str, url: str, *, timeout: float,
               content: bytes | None = None, json_body: object = None, headers: Mapping[str, str] | None = None,
               max_bytes: int = MAX_BODY_BYTES) -> EngineResponse:
    """Exactly one request within ``timeout`` seconds. Any status is returned (``expect_ok`` checks it);
    EngineError when there is no usable answer: transport error, timeout, a body over ``max_bytes`` or
    not UTF-8."""
    if not url:
        raise EngineError(f"{method}: no URL configured (set [server] url)")
    if json_body is not None:
        content = json.dumps(json_body).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    failed = f"engine request failed: {method} {url}"
    try:
        with anyio.fail_after(timeout):
            async with http.stream(method, url, content=content, headers=headers, timeout=timeout) as response:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise EngineError(f"{failed}: answer larger than {max_bytes} bytes")
    except TimeoutError:
        raise EngineError(f"{failed}: no answer within {timeout:.1f}s") from None
    except httpx.HTTPError as exc:
        raise EngineError(f"{failed}: {type(exc).__name__}: {exc}") from exc
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise EngineError(f"{failed}: the answer is not UTF-8 text") from None
    return EngineResponse(response.status_code, text)


def expect_ok(response: EngineResponse, what: str) -> None:
    """EngineError naming the status (and a short excerpt of the engine's answer) unless it is 2xx."""
    if not 200 <= response.status < 300:
        raise EngineError(f"{what}: HTTP {response.status}: {response.text.strip()[:200] or '(empty body)'}")


def parse_json(response: EngineResponse, what: str) -> object:
    try:
        return json.loads(response.text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"{what}: the answer is not JSON ({exc.msg} at {exc.pos})") from None
