"""Run several independent calls at once inside a step, and report each one's fate.

Used where one slow target must not delay another (load balancers, webhook URLs). Each call ends a
little before the step's own scope so the step is still alive to write what happened to each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

REPORT_MARGIN = 0.05
"""Seconds kept at the end of the step's scope to record the results."""


@dataclass(frozen=True)
class CallResult:
    name: str
    ok: bool
    detail: str
    timed_out: bool = False


async def fan_out(calls: Mapping[str, Callable[[], Awaitable[str]]]) -> list[CallResult]:
    """Run every call concurrently; a failure or overrun of one never affects the others."""
    results: dict[str, CallResult] = {}
    end = anyio.current_effective_deadline() - REPORT_MARGIN

    async def one(name: str, call: Callable[[], Awaitable[str]]) -> None:
        begin = anyio.current_time()
        with anyio.CancelScope(deadline=end) as scope:
            try:
                results[name] = CallResult(name, True, await call())
            except TimeoutError as exc:
                results[name] = CallResult(name, False, f"timed out: {exc}" if str(exc) else "timed out", True)
            except Exception as exc:
                results[name] = CallResult(name, False, f"{type(exc).__name__}: {exc}")
        if scope.cancelled_caught:
            took = anyio.current_time() - begin
            results[name] = CallResult(name, False, f"no answer within {took:.2f}s", True)

    async with anyio.create_task_group() as tg:
        for name, call in calls.items():
            tg.start_soon(one, name, call, name=f"fan-out-{name}")
    return [results[name] for name in calls]


def summary(results: list[CallResult]) -> str:
    """One line: 'name: detail; name: detail'."""
    return "; ".join(f"{r.name}: {r.detail}" for r in results)
