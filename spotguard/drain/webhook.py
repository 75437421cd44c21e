"""Webhooks: a JSON POST to every ``[webhook] urls`` entry when a drain starts and when it ends.

The body comes from ``[webhook] template`` (JSON text with placeholders) or is Slack-compatible
``{"text": "..."}``. It carries what happened to the node, never a prompt or an output. Each URL is
retried with jittered backoff until delivered or until the calling step's scope ends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import httpx
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from spotguard.drain.step import step_time_left
from spotguard.errors import SpotguardError
from spotguard.metrics import Metrics

Event = Literal["start", "end"]
MIN_ATTEMPT_SECONDS = 0.05
"""No new attempt is started with less time than this left in the step."""
MAX_ATTEMPTS = 50
"""A backstop should ``deliver`` ever run outside a step's scope (the step's budget is the real limit)."""


class WebhookError(SpotguardError):
    """A webhook could not be delivered; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, kw_only=True)
class WebhookFields:
    """What a webhook may say. ``summary`` (step outcomes) is empty on start."""

    event: Event
    state: str
    source: str
    kind: str
    instance: str
    reason: str
    seconds_left: float
    dry_run: bool = False
    summary: str = ""

    def values(self) -> dict[str, str]:
        return {
            "event": self.event,
            "state": self.state,
            "source": self.source,
            "kind": self.kind,
            "instance": self.instance,
            "reason": self.reason,
            "seconds_left": f"{self.seconds_left:.1f}",
            "summary": self.summary,
        }


def default_body(fields: WebhookFields) -> dict[str, Any]:
    """Slack-compatible text (Slack, Mattermost, Rocket.Chat and Teams workflows accept it)."""
    prefix = "[dry run] " if fields.dry_run else ""
    if fields.event == "start":
        text = (f"{prefix}spotguard: draining {fields.instance} ({fields.reason}); "
                f"{fields.seconds_left:.0f}s to the deadline")
    else:
        text = (f"{prefix}spotguard: drain of {fields.instance} finished ({fields.state}): {fields.summary}; "
                f"{fields.seconds_left:.1f}s before the deadline")
    return {"text": text}


def render(template: str, fields: WebhookFields) -> dict[str, Any] | list[Any]:
    """The body from ``template``: placeholders are replaced inside every JSON string.

    A string that is exactly ``{seconds_left}`` becomes a number. Raises ``ValueError`` when the
    template is not JSON.
    """
    parsed = json.loads(template)
    values = fields.values()

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            if node == "{seconds_left}":
                return round(fields.seconds_left, 1)
            for key, value in values.items():
                node = node.replace("{" + key + "}", value)
            return node
        if isinstance(node, list):
            return [fill(item) for item in node]
        if isinstance(node, dict):
            return {fill(k): fill(v) for k, v in node.items()}
        return node

    body = fill(parsed)
    if not isinstance(body, (dict, list)):
        raise ValueError("the template must be a JSON object or array")
    return body


def redact(url: str) -> str:
    """scheme://host[:port]/...: webhook paths often carry a secret token (Slack, Teams)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..." if parts.netloc else "<bad url>"


def _stop(state: RetryCallState) -> bool:
    return step_time_left() < MIN_ATTEMPT_SECONDS or state.attempt_number >= MAX_ATTEMPTS


async def deliver(client: httpx.AsyncClient, url: str, body: Mapping[str, Any] | list[Any], *,
                  timeout: float, metrics: Metrics) -> str:
    """POST ``body`` to ``url`` until it is accepted or the enclosing scope ends; returns a detail.

    Transport errors, timeouts, 408, 429 and 5xx are retried with jittered exponential backoff;
    another 4xx means the receiver refuses the body, which retrying cannot fix.
    """
    shown = redact(url)
    attempts = 0

    async def attempt() -> str:
        nonlocal attempts
        attempts += 1
        limit = max(MIN_ATTEMPT_SECONDS, min(timeout, step_time_left()))
        try:
            with anyio.fail_after(limit):
                response = await client.post(url, json=body, timeout=limit)
        except TimeoutError:
            raise WebhookError(f"{shown}: no answer within {limit:.1f}s", retryable=True) from None
        except httpx.HTTPError as exc:
            raise WebhookError(f"{shown}: {type(exc).__name__}: {exc}", retryable=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return f"delivered (HTTP {status}, attempt {attempts})"
        retryable = status in (408, 429) or status >= 500
        raise WebhookError(f"{shown}: HTTP {status}", retryable=retryable)

    retrying = AsyncRetrying(
        retry=_retryable,
        wait=wait_random_exponential(multiplier=0.1, max=2.0),
        stop=_stop,
        sleep=_sleep,
        reraise=True,
    )
    try:
        detail: str = await retrying(attempt)
    except WebhookError as exc:
        result = "failed" if exc.retryable else "rejected"
        metrics.webhooks.labels(result=result).inc()
        raise WebhookError(f"{exc} (after {attempts} attempts)", retryable=exc.retryable) from exc
    except anyio.get_cancelled_exc_class():
        metrics.webhooks.labels(result="timed_out").inc()
        raise
    metrics.webhooks.labels(result="delivered").inc()
    return detail


def _retryable(state: RetryCallState) -> bool:
    outcome = state.outcome
    if outcome is None or not outcome.failed:
        return False
    exc = outcome.exception()
    return isinstance(exc, WebhookError) and exc.retryable


async def _sleep(seconds: float) -> None:
    # Never sleep past the step's end: the scope would cancel us mid-backoff with nothing to report.
    await anyio.sleep(min(seconds, max(0.0, step_time_left() - MIN_ATTEMPT_SECONDS)))
