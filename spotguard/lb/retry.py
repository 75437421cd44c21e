"""The one retry policy and HTTP helper every load-balancer provider uses.

Throttling, 5xx, timeouts and transport errors are retried with jittered exponential backoff (a
``Retry-After`` is honoured) until the caller's budget would be overrun; 401/403/404 and other 4xx
become a ``LoadBalancerError`` that names the permission or resource to fix.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    wait_random_exponential,
)

from spotguard import logs
from spotguard.errors import LoadBalancerError

if TYPE_CHECKING:
    from spotguard.metrics import Metrics

T = TypeVar("T")

MAX_REQUEST_TIMEOUT = 10.0
"""One API request never waits longer than this, so a slow answer still leaves budget for a retry."""

RETRYABLE_STATUS = frozenset({408, 409, 412, 425, 429, 500, 502, 503, 504})
"""409/412 are lost optimistic-concurrency races (Kubernetes resourceVersion, ARM If-Match): re-read and retry."""


class TransientError(LoadBalancerError):
    """A failure worth retrying within the budget; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, kw_only=True)
class Fix:
    """What to tell the operator when a call is refused: the permission and the resource/setting."""

    permission: str
    resource: str
    setting: str


def count(metrics: Metrics | None, provider: str, result: str) -> None:
    if metrics is not None:
        metrics.lb_calls.labels(provider=provider, result=result).inc()


def _wait(state: RetryCallState) -> float:
    backoff = float(wait_random_exponential(multiplier=0.1, max=2.0)(state))
    outcome = state.outcome
    exc = outcome.exception() if outcome is not None else None
    hint = exc.retry_after if isinstance(exc, TransientError) else None
    return max(backoff, hint) if hint is not None else backoff


async def with_retries(call: Callable[[], Awaitable[T]], *, what: str, budget: float, provider: str,
                       metrics: Metrics | None) -> T:
    """Run ``call`` until it succeeds, fails for good, or the next try would not fit in ``budget`` seconds."""
    if budget <= 0:
        raise LoadBalancerError(f"{what}: no time left in the budget")
    last: list[BaseException] = []

    async def attempt() -> T:
        try:
            result = await call()
        except TransientError as exc:
            last.append(exc)
            count(metrics, provider, "retry")
            logs.get("lb").warning("lb call failed, will retry within the budget", provider=provider, what=what,
                                   error=str(exc), attempt=len(last))
            raise
        except LoadBalancerError as exc:
            count(metrics, provider, "error")
            logs.get("lb").error("lb call refused", provider=provider, what=what, error=str(exc))
            raise
        count(metrics, provider, "ok")
        return result

    try:
        with anyio.fail_after(budget):
            async for try_ in AsyncRetrying(stop=stop_before_delay(budget), wait=_wait, sleep=anyio.sleep,
                                            retry=retry_if_exception_type(TransientError), reraise=True):
                with try_:
                    return await attempt()
    except TimeoutError:
        count(metrics, provider, "timeout")
        tail = f"; last error: {last[-1]}" if last else ""
        raise LoadBalancerError(f"{what}: not done within {budget:.1f}s{tail}") from None
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    value = headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def api_message(response: httpx.Response) -> str:
    """The error text an API put in its body (Google, ARM and Kubernetes shapes), shortened."""
    try:
        data: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:200]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:300]
    return response.text[:200]


def raise_for_status(response: httpx.Response, *, what: str, fix: Fix) -> None:
    """Map an API answer to our errors: retryable -> TransientError, refused -> LoadBalancerError."""
    status = response.status_code
    if status < 300:
        return
    detail = api_message(response)
    if status in RETRYABLE_STATUS:
        raise TransientError(f"{what}: HTTP {status}: {detail}", retry_after=retry_after(response.headers))
    if status == 401:
        raise LoadBalancerError(f"{what}: HTTP 401, the credentials were rejected ({detail}); "
                                f"check the identity used for {fix.setting}")
    if status == 403:
        raise LoadBalancerError(f"{what}: HTTP 403, permission denied ({detail}); "
                                f"grant {fix.permission} on {fix.resource}")
    if status == 404:
        raise LoadBalancerError(f"{what}: HTTP 404, {fix.resource} not found ({detail}); check {fix.setting}")
    raise LoadBalancerError(f"{what}: HTTP {status}: {detail}")


async def send(http: httpx.AsyncClient, method: str, url: str, *, what: str, fix: Fix, timeout: float,
               headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
               body: Any = None, content_type: str = "application/json",
               done_already: Callable[[httpx.Response], bool] | None = None) -> httpx.Response:
    """One API request under ``timeout``; transport failures become ``TransientError``.

    ``done_already`` says whether an error answer means the change is already in place (adding a member
    twice): then the response is returned, not raised.
    """
    all_headers = dict(headers or {})
    content: bytes | None = None
    if body is not None:
        content = json.dumps(body).encode()
        all_headers["Content-Type"] = content_type
    limit = max(0.1, min(timeout, MAX_REQUEST_TIMEOUT))
    try:
        with anyio.fail_after(limit):
            response = await http.request(method, url, headers=all_headers, params=params, content=content,
                                          timeout=limit)
    except TimeoutError:
        raise TransientError(f"{what}: no answer within {limit:.1f}s") from None
    except httpx.TransportError as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise LoadBalancerError(f"{what}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 300 and done_already is not None and done_already(response):
        return response
    raise_for_status(response, what=what, fix=fix)
    return response


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The response body as a JSON object, or a LoadBalancerError saying it was not one."""
    try:
        data: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LoadBalancerError(f"{what}: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise LoadBalancerError(f"{what}: the answer is not a JSON object")
    return data


@dataclass(frozen=True)
class CallDeadline:
    """An absolute moment on anyio's clock: one budget shared by several calls to a balancer's API
    (``spotguard.deadline.Deadline`` is the VM's and the drain's)."""

    end: float

    @classmethod
    def after(cls, budget: float) -> CallDeadline:
        return cls(anyio.current_time() + budget)

    def left(self) -> float:
        return self.end - anyio.current_time()
