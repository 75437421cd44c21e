"""The steps that talk to the platform: deregister, acknowledge, and lifecycle heartbeats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import anyio

from spotguard.drain.fanout import REPORT_MARGIN, CallResult, fan_out, summary
from spotguard.drain.step import DrainContext, StepResult, step_time_left

if TYPE_CHECKING:
    from spotguard.lb.base import LoadBalancer
    from spotguard.notice import Notice

HEARTBEAT_INTERVAL = 10.0
"""Seconds between lifecycle heartbeats; an ASG hook's HeartbeatTimeout is at least 30 s."""
HEARTBEAT_TIMEOUT = 5.0
DEREGISTER_FLOOR = 3.0
"""Seconds deregister always gets, even on a late notice: one API call per load balancer fits."""
CORE_STEPS = ("readiness", "stop_accepting", "deregister", "wait_inflight", "migrate", "snapshot")
"""What must be over before the platform is told it may go on."""
LIFECYCLE_NOTICES = frozenset({("aws", "asg-terminated")})
"""(source, kind) of the notices that mean an ASG lifecycle action is waiting on this instance."""


def lifecycle_pending(notice: Notice) -> bool:
    """Whether an ASG lifecycle action waits on this instance, so heartbeats and completion make sense.

    A termination hook holds the instance in Terminating:Wait, which IMDS shows as
    ``autoscaling/target-lifecycle-state`` = ``Terminated``: exactly the ``asg-terminated`` notice. Any
    other drain (spot interruption, rebalance, scheduled event, Azure, GCP, manual) has no action to
    complete - CompleteLifecycleAction would fail with "No active Lifecycle Action" - and where an ASG
    does terminate a spot instance, the instance goes at the notice's time whatever the hook says.
    """
    return (notice.source, notice.kind) in LIFECYCLE_NOTICES


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def outcome_of(results: list[CallResult], ctx: DrainContext, detail: str) -> str | StepResult:
    """failed when any call failed outright, else timed_out when any ran out of time, else ok."""
    if any(not r.ok and not r.timed_out for r in results):
        return StepResult("failed", detail)
    if any(r.timed_out for r in results):
        return StepResult("timed_out", detail)
    return StepResult("dry_run", detail) if ctx.dry_run else detail


class Deregister:
    """Leave every configured load balancer, all at once."""

    name = "deregister"
    after: tuple[str, ...] = ()
    floor = DEREGISTER_FLOOR

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.deregister_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        balancers = ctx.services.balancers
        if not balancers:
            return StepResult("skipped", "no load balancer configured")
        calls: dict[str, Callable[[], Awaitable[str]]] = {}
        for name, lb in zip(unique_names([lb.name for lb in balancers]), balancers, strict=True):
            calls[name] = partial(_deregister, lb, ctx.dry_run)
        results = await fan_out(calls)
        return outcome_of(results, ctx, summary(results))


class Acknowledge:
    """Tell the platform the drain is over: approve the Azure event, complete a pending ASG lifecycle action."""

    name = "acknowledge"
    after: tuple[str, ...] = CORE_STEPS
    floor = 0.0

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.deregister_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        calls: dict[str, Callable[[], Awaitable[str]]] = {}
        approve = ctx.services.acknowledge
        event_id = ctx.notice.event_id
        cloud_ack = approve is not None and ctx.notice.source == "azure" and ctx.config.azure.acknowledge
        if approve is not None and cloud_ack:
            if ctx.dry_run:
                calls["azure"] = lambda: _text(f"would approve scheduled event {event_id}")
            else:
                calls["azure"] = lambda: approve(event_id)
        balancers = ctx.services.balancers if lifecycle_pending(ctx.notice) else ()
        for name, lb in zip(unique_names([lb.name for lb in balancers]), balancers, strict=True):
            calls[name] = partial(_complete, lb, ctx.dry_run)
        if not calls:
            if ctx.notice.source != "azure":
                why = f"a {ctx.notice.source} notice has no approval call"
            elif not ctx.config.azure.acknowledge:
                why = "[azure] acknowledge is off"
            else:
                why = "no Azure approval call is set up"
            return StepResult("skipped", f"nothing to acknowledge: {why} and no lifecycle action is pending "
                                         f"(only an ASG termination, asg-terminated, holds one)")
        results = await fan_out(calls)
        return outcome_of(results, ctx, summary(results))


async def _text(value: str) -> str:
    return value


# Each call gets what is left of the step, minus the moment fan_out keeps to report.
async def _deregister(lb: LoadBalancer, dry_run: bool) -> str:
    return await lb.deregister(budget=max(0.0, step_time_left() - 2 * REPORT_MARGIN), dry_run=dry_run)


async def _complete(lb: LoadBalancer, dry_run: bool) -> str:
    return await lb.complete(budget=max(0.0, step_time_left() - 2 * REPORT_MARGIN), dry_run=dry_run)


async def heartbeat(ctx: DrainContext) -> None:
    """Keep a pending lifecycle action (ASG hook) open while the drain runs; the engine cancels it at the end."""
    balancers = ctx.services.balancers
    if not balancers or not lifecycle_pending(ctx.notice):
        return
    while True:
        async with anyio.create_task_group() as tg:
            for lb in balancers:
                tg.start_soon(_beat, ctx, lb.name, lb.heartbeat)
        await anyio.sleep(HEARTBEAT_INTERVAL)


async def _beat(ctx: DrainContext, name: str, call: Callable[..., Awaitable[None]]) -> None:
    try:
        with anyio.fail_after(HEARTBEAT_TIMEOUT):
            await call(dry_run=ctx.dry_run)
    except Exception as exc:  # one missed heartbeat is retried at the next interval
        ctx.log.warning("lifecycle heartbeat failed", balancer=name, error=f"{type(exc).__name__}: {exc}")
        ctx.metrics.config_errors.labels(component="drain", reason="heartbeat").inc()
