"""The steps that stop the local engine serving: readiness, stop_accepting, wait_inflight."""

from __future__ import annotations

import anyio

from spotguard.drain.step import DrainContext, StepResult, step_time_left, tail_reserve
from spotguard.errors import EngineError, GateError

READINESS_BUDGET = 1.0
POLL_INTERVAL = 0.2
"""Seconds between in-flight polls while waiting for requests to finish."""
INFLIGHT_CALL_TIMEOUT = 2.0


class Readiness:
    """Turn /readyz to 503 first, so health-checking balancers start moving traffic away at once."""

    name = "readiness"
    after: tuple[str, ...] = ()

    def budget(self, ctx: DrainContext) -> float:
        return READINESS_BUDGET

    async def run(self, ctx: DrainContext) -> str | StepResult:
        if ctx.dry_run:
            return StepResult("dry_run", "would mark this node not ready (/readyz 503)")
        ctx.services.set_ready(False)
        return "marked not ready (/readyz answers 503)"


class StopAccepting:
    """Ask the inference engine to take no new work (and to drain, where it can)."""

    name = "stop_accepting"
    after: tuple[str, ...] = ()

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.stop_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        engine = ctx.services.engine
        detail = await engine.stop_accepting(dry_run=ctx.dry_run)
        if ctx.dry_run:
            return StepResult("dry_run", f"{engine.name}: {detail}")
        return f"{engine.name}: {detail}"


async def inflight_count(ctx: DrainContext) -> int | None:
    """Requests still running: the engine's count and the gate journal's, whichever is larger.

    None when neither can tell. An engine that fails to answer counts as "cannot tell" for this poll.
    """
    counts: list[int] = []
    try:
        with anyio.fail_after(max(0.01, min(INFLIGHT_CALL_TIMEOUT, step_time_left()))):
            engine_count = await ctx.services.engine.inflight()
        if engine_count is not None:
            counts.append(engine_count)
    except (EngineError, TimeoutError) as exc:
        ctx.log.warning("in-flight count unavailable", engine=ctx.services.engine.name,
                        error=f"{type(exc).__name__}: {exc}")
        ctx.metrics.config_errors.labels(component="drain", reason="inflight").inc()
    if ctx.services.journal is not None:
        try:
            with anyio.fail_after(max(0.01, min(INFLIGHT_CALL_TIMEOUT, step_time_left()))):
                counts.append(await ctx.services.journal.count())
        except (GateError, TimeoutError) as exc:
            ctx.log.warning("gate journal count unavailable", error=f"{type(exc).__name__}: {exc}")
            ctx.metrics.config_errors.labels(component="drain", reason="gate_journal").inc()
    return max(counts) if counts else None


class WaitInflight:
    """Wait for running requests to finish, keeping enough time for the snapshot after it."""

    name = "wait_inflight"
    after: tuple[str, ...] = ("stop_accepting",)

    def budget(self, ctx: DrainContext) -> float:
        left = ctx.seconds_left()
        reserve = tail_reserve(left)
        if ctx.services.snapshot is not None:
            # The snapshot saves whatever is still running: never let waiting eat all of its time.
            reserve += min(ctx.config.drain.snapshot_budget, 0.5 * (left - reserve))
        return max(0.0, min(ctx.config.drain.wait_inflight_budget, left - reserve))

    async def run(self, ctx: DrainContext) -> str | StepResult:
        begin = anyio.current_time()
        count = await inflight_count(ctx)
        if ctx.dry_run:
            shown = "an unknown number of" if count is None else str(count)
            return StepResult("dry_run", f"would wait up to {step_time_left():.1f}s for {shown} in-flight requests")
        while True:
            if count is None:
                return StepResult("skipped", "the engine cannot report in-flight requests and no gate is set")
            took = anyio.current_time() - begin
            if count == 0:
                return f"no requests in flight after {took:.2f}s"
            if step_time_left() <= POLL_INTERVAL + 0.05:
                return StepResult("timed_out", f"{count} requests still in flight after {took:.2f}s; "
                                                "left for the snapshot")
            await anyio.sleep(POLL_INTERVAL)
            count = await inflight_count(ctx)
