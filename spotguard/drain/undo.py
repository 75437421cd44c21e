"""The undo plan an undrain runs: put back what the drain changed, each step budgeted and reported.

    resume_engine ── reopen_gate
    register

A step undoes only what the drain's timeline says was attempted (a step that ran, whatever its outcome,
or was cut while running): a drain that never stopped the engine does not restart it. The gate reopens
after the engine was asked to start, and /readyz stays 503 until the engine's health URL answers, so
health-checking load balancers send nothing before the engine can take it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

from spotguard.drain.balancers import outcome_of, unique_names
from spotguard.drain.fanout import REPORT_MARGIN, fan_out, summary
from spotguard.drain.step import DrainContext, Step, StepResult, step_time_left
from spotguard.errors import ManualActionRequired

if TYPE_CHECKING:
    from spotguard.drain.timeline import Timeline
    from spotguard.lb.base import LoadBalancer

REOPEN_BUDGET = 1.0


def attempted(drained: Timeline | None, name: str) -> bool:
    """Did the drain act in step ``name``? Done with a real outcome, or left running (a crash, a forced undrain)."""
    for record in drained.steps if drained is not None else ():
        if record.name != name:
            continue
        if record.state == "running":
            return True
        return record.state == "done" and record.outcome not in ("skipped", "dry_run")
    return False


class ResumeEngine:
    """Start the engine again when the drain stopped it (``systemctl start`` of its unit)."""

    name = "resume_engine"
    after: tuple[str, ...] = ()
    floor = 0.0

    def __init__(self, needed: bool) -> None:
        self.needed = needed

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.stop_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        engine = ctx.services.engine
        if not self.needed:
            return StepResult("skipped", "the drain did not stop the engine")
        try:
            detail = await engine.resume_accepting(dry_run=ctx.dry_run)
        except ManualActionRequired as exc:
            return StepResult("manual", f"{engine.name}: {exc}")
        return f"{engine.name}: {detail}"


class ReopenGate:
    """Let the gate take new requests again (it refused them with 503 since the drain began)."""

    name = "reopen_gate"
    after: tuple[str, ...] = ("resume_engine",)
    floor = 0.0

    def budget(self, ctx: DrainContext) -> float:
        return REOPEN_BUDGET

    async def run(self, ctx: DrainContext) -> str | StepResult:
        ctx.services.refuse_new_work(False)
        if ctx.services.journal is None:
            return StepResult("skipped", "no gate configured")
        return "the gate accepts new requests"


class Register:
    """Put this VM back into every load balancer the drain took it out of."""

    name = "register"
    after: tuple[str, ...] = ()
    floor = 0.0

    def __init__(self, needed: bool) -> None:
        self.needed = needed

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.deregister_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        balancers = ctx.services.balancers
        if not balancers:
            return StepResult("skipped", "no load balancer configured")
        if not self.needed:
            return StepResult("skipped", "the drain did not deregister this node")
        calls: dict[str, Callable[[], Awaitable[str]]] = {}
        for name, lb in zip(unique_names([lb.name for lb in balancers]), balancers, strict=True):
            calls[name] = partial(_register, lb, ctx.dry_run)
        results = await fan_out(calls)
        return outcome_of(results, ctx, summary(results))


async def _register(lb: LoadBalancer, dry_run: bool) -> str:
    return await lb.register(budget=max(0.0, step_time_left() - 2 * REPORT_MARGIN), dry_run=dry_run)


def undo_plan(drained: Timeline | None) -> list[Step]:
    """The undo steps for the drain whose timeline is ``drained`` (None: no drain was recorded)."""
    return [ResumeEngine(attempted(drained, "stop_accepting")), ReopenGate(),
            Register(attempted(drained, "deregister"))]
