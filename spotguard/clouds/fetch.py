"""The one HTTP helper every metadata source uses: bounded time, bounded size, typed errors.

It makes exactly one request; retrying is the runner's job (it owns backoff and error counting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import httpx

from spotguard.errors import MalformedMetadata, MetadataUnavailable

MAX_BODY_BYTES = 256 * 1024
"""Metadata answers are small; anything bigger is garbage and is not read past this."""

RETRYABLE_STATUS = frozenset({408, 410, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class MetadataResponse:
    status: int
    text: str
    headers: Mapping[str, str]


async def request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    content: bytes | None = None,
    timeout: float,
    max_bytes: int = MAX_BODY_BYTES,
) -> MetadataResponse:
    """One metadata request under a hard deadline.

    Transport errors, timeouts and retryable statuses raise ``MetadataUnavailable``; a body over
    ``max_bytes`` or one that is not text raises ``MalformedMetadata``. Other statuses (200, 404,
    401, 400, ...) are returned for the caller to interpret.
    """
    try:
        with anyio.fail_after(timeout):
            async with client.stream(method, url, headers=headers, params=params, content=content,
                                     timeout=timeout) as response:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise MalformedMetadata(f"{method} {url}: body larger than {max_bytes} bytes",
                                                reason="too_large")
    except TimeoutError:
        raise MetadataUnavailable(f"{method} {url}: no answer within {timeout:.1f}s", reason="timeout") from None
    except httpx.TimeoutException as exc:
        raise MetadataUnavailable(f"{method} {url}: timed out ({type(exc).__name__})", reason="timeout") from exc
    except httpx.TransportError as exc:
        raise MetadataUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}", reason="connection") from exc
    except httpx.HTTPError as exc:
        raise MetadataUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}", reason="http") from exc
    if response.status_code in RETRYABLE_STATUS:
        reason = "throttled" if response.status_code == 429 else f"status_{response.status_code}"
        raise MetadataUnavailable(f"{method} {url}: HTTP {response.status_code}", reason=reason)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMetadata(f"{method} {url}: body is not UTF-8 text", reason="not_text") from None
    return MetadataResponse(response.status_code, text, dict(response.headers))
