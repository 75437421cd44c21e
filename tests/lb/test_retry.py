"""The shared retry policy: Retry-After parsing, budget, and which errors are retried."""

from __future__ import annotations

import email.utils
import time

import anyio
import pytest

from spotguard.errors import LoadBalancerError
from spotguard.lb.retry import TransientError, retry_after, with_retries
from spotguard.metrics import Metrics


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after({"retry-after": "3"}) == 3.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (retry_after({"retry-after": later}) or 0) <= 31
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


@pytest.mark.anyio
async def test_permanent_errors_are_not_retried() -> None:
    calls: list[int] = []

    async def refuse() -> None:
        calls.append(1)
        raise LoadBalancerError("HTTP 403")

    metrics = Metrics()
    with anyio.fail_after(5), pytest.raises(LoadBalancerError, match="403"):
        await with_retries(refuse, what="x", budget=2, provider="test", metrics=metrics)
    assert calls == [1]
    assert metrics.lb_calls.labels(provider="test", result="error")._value.get() == 1


@pytest.mark.anyio
async def test_a_call_hanging_past_the_budget_is_cut_off() -> None:
    async def hang() -> None:
        await anyio.sleep(60)

    # Cut by its own 0.3 s budget (that error), not by the test's hang guard (a TimeoutError).
    with anyio.fail_after(5), pytest.raises(LoadBalancerError, match="not done within 0.3s"):
        await with_retries(hang, what="x", budget=0.3, provider="test", metrics=None)


@pytest.mark.anyio
async def test_a_retry_after_beyond_the_budget_stops_at_once() -> None:
    calls: list[int] = []

    async def throttled() -> None:
        calls.append(1)
        raise TransientError("HTTP 429", retry_after=30)

    # The 429 itself comes back (no "not done within" from sleeping out the budget), after one call.
    with anyio.fail_after(5), pytest.raises(TransientError, match="HTTP 429"):
        await with_retries(throttled, what="x", budget=2, provider="test", metrics=None)
    assert calls == [1]
