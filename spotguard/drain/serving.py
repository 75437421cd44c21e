"""The steps that stop the local engine serving: readiness, stop_accepting, wait_inflight."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from spotguard.config import DrainConfig
from spotguard.drain.step import DrainContext, StepResult, step_time_left, tail_reserve
from spotguard.errors import EngineError, GateError

READINESS_BUDGET = 1.0
STOP_FLOOR = 2.0
"""Seconds stop_accepting always gets, even on a notice that is already late (a signal takes milliseconds)."""
POLL_INTERVAL = 0.2
"""Seconds between in-flight polls while waiting for requests to finish."""
INFLIGHT_CALL_TIMEOUT = 2.0


class Readiness:
    """Turn /readyz to 503 first, so health-checking balancers start moving traffic away at once."""

    name = "readiness"
    after: tuple[str, ...] = ()
    floor = READINESS_BUDGET

    def budget(self, ctx: DrainContext) -> float:
        return READINESS_BUDGET

    async def run(self, ctx: DrainContext) -> str | StepResult:
        if ctx.dry_run:
            return StepResult("dry_run", "would mark this node not ready (/readyz 503)")
        # Before stop_accepting's first await (steps start in plan order): an engine that cannot refuse
        # work itself (llama-server) is covered by the gate from here on.
        ctx.services.refuse_new_work(True)
        return "marked not ready (/readyz answers 503)"


class StopAccepting:
    """Ask the inference engine to take no new work (and to drain, where it can)."""

    name = "stop_accepting"
    after: tuple[str, ...] = ()
    floor = STOP_FLOOR

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.stop_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        engine = ctx.services.engine
        detail = await engine.stop_accepting(dry_run=ctx.dry_run)
        if ctx.dry_run:
            return StepResult("dry_run", f"{engine.name}: {detail}")
        return f"{engine.name}: {detail}"


@dataclass(frozen=True)
class InflightReading:
    count: int | None
    """Requests still running; None when it cannot be told this time."""
    unreadable: str = ""
    """Why the engine's count could not be read this time ("" when it answered or cannot tell by design)."""


async def inflight_count(ctx: DrainContext) -> InflightReading:
    """Requests still running: the gate's journal when the gate is on (it sees every request through it),
    raised to the engine's own count when that is readable.

    An engine that fails to answer is "unreadable", not "none left": real engines stop serving their
    metrics once told to stop (vLLM's HTTP server goes away while requests finish).
    """
    engine_count: int | None = None
    unreadable = ""
    try:
        with anyio.fail_after(max(0.01, min(INFLIGHT_CALL_TIMEOUT, step_time_left()))):
            engine_count = await ctx.services.engine.inflight()
    except (EngineError, TimeoutError) as exc:
        unreadable = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        ctx.metrics.config_errors.labels(component="drain", reason="inflight").inc()
    counts = [c for c in (engine_count,) if c is not None]
    if ctx.services.journal is not None:
        try:
            with anyio.fail_after(max(0.01, min(INFLIGHT_CALL_TIMEOUT, step_time_left()))):
                counts.append(await ctx.services.journal.count())
        except (GateError, TimeoutError) as exc:
            unreadable = unreadable or f"gate journal: {type(exc).__name__}: {exc}"
            ctx.metrics.config_errors.labels(component="drain", reason="gate_journal").inc()
    return InflightReading(max(counts) if counts else None, unreadable)


RECORDS_RESERVE = 1.0
"""Seconds kept for the snapshot after the wait when peers take what is left: it only writes small records
of answers already continued elsewhere (their KV is not needed: the peer prefills again)."""


def wait_inflight_budget(left: float, drain: DrainConfig, *, snapshot: bool, peers: bool) -> float:
    """Seconds wait_inflight may wait when ``left`` seconds remain to the drain deadline.

    With peers the wait lasts almost to the drain deadline: the gate hands over at once, when the drain
    begins, every answer that will not finish here by then (``gate/estimate.py``), so what runs here is
    expected to finish; the migrate step after this wait continues anything that still has not. Without
    peers the snapshot saves whatever is still running, so waiting never eats all of its time.

    A pure function of the plan, so bench/sim/behaviour.py can tell when a drain cuts what is still running.
    """
    reserve = tail_reserve(left)
    if snapshot:
        share = RECORDS_RESERVE if peers else 0.5 * (left - reserve)
        reserve += min(drain.snapshot_budget, share)
    return max(0.0, min(drain.wait_inflight_budget, left - reserve))


def hands_to_peers(ctx: DrainContext) -> bool:
    """Whether what is still running when the wait ends is continued on peers (migrate) rather than cut."""
    return bool(ctx.config.gate.peers) and ctx.services.journal is not None


class WaitInflight:
    """Wait for running requests to finish, keeping enough time for the snapshot after it."""

    name = "wait_inflight"
    after: tuple[str, ...] = ("stop_accepting",)
    floor = 0.0

    def budget(self, ctx: DrainContext) -> float:
        return wait_inflight_budget(ctx.seconds_left(), ctx.config.drain, snapshot=ctx.services.snapshot is not None,
                                    peers=hands_to_peers(ctx))

    async def run(self, ctx: DrainContext) -> str | StepResult:
        begin = anyio.current_time()
        reading = await inflight_count(ctx)
        if ctx.dry_run:
            shown = "an unknown number of" if reading.count is None else str(reading.count)
            return StepResult("dry_run", f"would wait up to {step_time_left():.1f}s for {shown} in-flight requests")
        logged = False
        while True:
            if reading.count is None and not reading.unreadable:
                return StepResult("skipped", "the engine cannot report in-flight requests and no gate is set")
            if reading.unreadable and not logged:
                ctx.log.warning("in-flight count unreadable; waiting within the budget",
                                engine=ctx.services.engine.name, error=reading.unreadable)
                logged = True
            took = anyio.current_time() - begin
            if reading.count == 0:
                return f"no requests in flight after {took:.2f}s"
            if step_time_left() <= POLL_INTERVAL + 0.05:
                if reading.count is None:
                    return StepResult("timed_out", f"in-flight count unreadable for {took:.2f}s "
                                                   f"({reading.unreadable}); left for the snapshot")
                if hands_to_peers(ctx):
                    # Not a time-out: with peers the budget runs the wait almost to the drain's end on purpose,
                    # keeping only RECORDS_RESERVE (1 s) for the snapshot's records and the tail; migrate continues
                    # on the peers what still runs here.
                    return StepResult("handed_over", f"{reading.count} requests still in flight after "
                                                     f"{took:.2f}s: handed to migrate, which continues them on peers")
                return StepResult("timed_out", f"{reading.count} requests still in flight after {took:.2f}s; "
                                                "left for the snapshot")
            await anyio.sleep(POLL_INTERVAL)
            reading = await inflight_count(ctx)
