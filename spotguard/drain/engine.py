"""Runs a drain plan as a DAG under the drain deadline.

Each step starts once every step in its ``after`` is done (whatever its outcome: a failed step never
stops the ones after it) and runs in its own cancel scope of ``min(budget, time left)``. Steps with
no path between them run concurrently. A second, earlier notice tightens the deadline of every
running scope through ``tighten``. A step's ``floor`` is time it gets even past the deadline: on a late
notice the cheap safety steps still take the node out of rotation, only the open-ended ones are cut. Every transition yields a new ``Timeline`` passed to
``on_change``; resuming from a persisted timeline never repeats a finished step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import anyio

from spotguard.deadline import Deadline
from spotguard.drain.balancers import heartbeat
from spotguard.drain.step import DrainContext, Step, StepResult
from spotguard.drain.timeline import Outcome, StepRecord, Timeline, verdict
from spotguard.notice import utcnow

OnChange = Callable[[Timeline], None]
Background = Callable[[DrainContext], Awaitable[None]]

MIN_STEP_SECONDS = 0.01
"""A step with less time than this left is recorded as timed out without being started."""


def check_plan(steps: Sequence[Step]) -> None:
    """Refuse duplicate names, unknown dependencies and cycles (a bug in the plan, not in input)."""
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate step names in plan: {names}")
    known = set(names)
    for step in steps:
        missing = [dep for dep in step.after if dep not in known]
        if missing:
            raise ValueError(f"step {step.name!r} waits for unknown steps {missing}")
    order: list[str] = []
    remaining = {step.name: set(step.after) for step in steps}
    while remaining:
        ready = [name for name, deps in remaining.items() if deps <= set(order)]
        if not ready:
            raise ValueError(f"cycle among steps {sorted(remaining)}")
        order.extend(ready)
        for name in ready:
            del remaining[name]


class DrainEngine:
    """One drain. Build it with the plan and the context, then ``await run()`` once."""

    def __init__(
        self,
        steps: Sequence[Step],
        ctx: DrainContext,
        *,
        timeline: Timeline | None = None,
        on_change: OnChange | None = None,
        background: Sequence[Background] | None = None,
        purpose: Literal["drain", "restore"] = "drain",
    ) -> None:
        """``background`` runs beside the steps and is cancelled after them; None = lifecycle heartbeats.

        ``purpose`` = restore runs an undo plan (``undo.py``): counted apart from drains.
        """
        check_plan(steps)
        self._steps = list(steps)
        self._ctx = dataclasses.replace(ctx, progress=lambda: self._timeline)
        self._on_change = on_change
        self._background = (heartbeat,) if background is None else tuple(background)
        self._running: dict[str, tuple[Step, anyio.CancelScope]] = {}
        self._purpose = purpose
        self._timeline = self._initial_timeline(timeline)

    @property
    def timeline(self) -> Timeline:
        return self._timeline

    @property
    def deadline(self) -> Deadline:
        return self._ctx.deadline

    def _initial_timeline(self, resumed: Timeline | None) -> Timeline:
        ctx = self._ctx
        old = {r.name: r for r in resumed.steps} if resumed else {}
        records = []
        for step in self._steps:
            record = old.get(step.name)
            if record is None or record.state != "done":
                # A step a crash left running is run again: its effect may be incomplete.
                attempts = record.attempts if record else 0
                record = StepRecord(name=step.name, after=tuple(step.after), attempts=attempts)
            records.append(record)
        if resumed is not None:
            # The deadline is the agent's (persisted with the timeline, tightened since if need be).
            return dataclasses.replace(resumed, deadline=ctx.deadline.drain, steps=tuple(records),
                                       finished_at=None, result=None)
        return Timeline(notice_key=ctx.notice.key, deadline=ctx.deadline.drain, started_at=utcnow(),
                        dry_run=ctx.dry_run, steps=tuple(records))

    def _publish(self, timeline: Timeline) -> None:
        self._timeline = timeline
        if self._on_change is not None:
            try:
                self._on_change(timeline)
            except Exception as exc:  # persisting must never stop the drain
                self._ctx.log.error("drain timeline not persisted", error=f"{type(exc).__name__}: {exc}")
                self._ctx.metrics.config_errors.labels(component="drain", reason="persist").inc()

    def tighten(self, deadline: Deadline) -> bool:
        """Move the drain deadline earlier (a second notice); running steps adopt it at once.

        The steps work to ``deadline.drain``. Each running step's scope ends at the earlier of its current
        end and ``min(budget, time left)`` worked out anew, so a step that keeps time for the ones after it
        (wait_inflight for the snapshot) still does. Returns False when ``deadline`` does not end the drain
        earlier than the current one, which is then kept.
        """
        if deadline.drain >= self._ctx.deadline.drain:
            return False
        self._ctx = dataclasses.replace(self._ctx, deadline=deadline)
        now = anyio.current_time()
        left = self._ctx.seconds_left()
        for step, scope in self._running.values():
            target = now + self._allowed(step, left)
            if target < scope.deadline:
                scope.deadline = target
        self._ctx.log.warning("drain deadline tightened", deadline=deadline.drain.isoformat(),
                              seconds_left=round(self._ctx.seconds_left(), 3))
        self._publish(dataclasses.replace(self._timeline, deadline=deadline.drain))
        return True

    async def run(self) -> Timeline:
        """Run every step not yet done; returns the finished timeline."""
        ctx = self._ctx
        ctx.log.info("drain started", notice=ctx.notice.key, seconds_left=round(ctx.seconds_left(), 3),
                     dry_run=ctx.dry_run, steps=[s.name for s in self._steps])
        self._publish(self._timeline)
        done = {step.name: anyio.Event() for step in self._steps}
        for record in self._timeline.steps:
            if record.state == "done":
                done[record.name].set()
        async with anyio.create_task_group() as outer:
            for task in self._background:
                outer.start_soon(self._background_task, task, name=f"drain-background-{task.__name__}")
            async with anyio.create_task_group() as tg:
                for step in self._steps:
                    if not done[step.name].is_set():
                        tg.start_soon(self._run_step, step, done, name=f"drain-step-{step.name}")
            outer.cancel_scope.cancel()
        return self._finish()

    async def _background_task(self, task: Background) -> None:
        try:
            await task(self._ctx)
        except Exception as exc:  # background help (heartbeats) must never end the drain
            self._ctx.log.error("drain background task failed", task=task.__name__,
                                error=f"{type(exc).__name__}: {exc}")
            self._ctx.metrics.config_errors.labels(component="drain", reason="background").inc()

    async def _run_step(self, step: Step, done: dict[str, anyio.Event]) -> None:
        for dep in step.after:
            await done[dep].wait()  # bounded: every dependency finishes by the drain deadline
        try:
            await self._execute(step)
        finally:
            done[step.name].set()

    async def _execute(self, step: Step) -> None:
        ctx = self._ctx
        record = self._timeline.step(step.name)
        started_at = utcnow()
        budget = self._allowed(step, ctx.seconds_left())
        record = dataclasses.replace(record, state="running", started_at=started_at, attempts=record.attempts + 1)
        self._publish(self._timeline.with_step(record))
        if budget < MIN_STEP_SECONDS:
            self._record(step, record, "timed_out", "no time left before the drain deadline", 0.0)
            return
        ctx.log.info("drain step started", step=step.name, budget=round(budget, 3))
        begin = anyio.current_time()
        outcome: Outcome
        handed_over = 0
        with anyio.CancelScope(deadline=begin + budget) as scope:
            self._running[step.name] = (step, scope)
            try:
                result = await step.run(ctx)
                if isinstance(result, StepResult):
                    outcome, detail, handed_over = result.outcome, result.detail, result.handed_over
                else:
                    outcome, detail = "ok", str(result)
            except TimeoutError as exc:
                outcome, detail = "timed_out", f"timed out: {exc}" if str(exc) else "timed out"
            except Exception as exc:
                outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                self._running.pop(step.name, None)
        elapsed = anyio.current_time() - begin
        if scope.cancelled_caught:
            outcome = "timed_out"
            detail = f"timed out after {elapsed:.2f}s (budget {budget:.2f}s)"
        if ctx.dry_run and outcome == "ok":
            outcome = "dry_run"  # a step that forgot to say so still did nothing on purpose
        self._record(step, record, outcome, detail, elapsed, handed_over)

    def _allowed(self, step: Step, left: float) -> float:
        """The step's budget cut to the time left, but never below its floor (itself capped by the budget)."""
        budget = self._budget(step)
        return max(0.0, min(step.floor, budget), min(budget, left))

    def _budget(self, step: Step) -> float:
        try:
            return float(step.budget(self._ctx))
        except Exception as exc:  # a broken budget must not cost the step its run: use what is left
            self._ctx.log.error("drain step budget failed", step=step.name, error=f"{type(exc).__name__}: {exc}")
            return self._ctx.seconds_left()

    def _record(self, step: Step, record: StepRecord, outcome: Outcome, detail: str, elapsed: float,
                handed_over: int = 0) -> None:
        ctx = self._ctx
        finished = dataclasses.replace(record, state="done", outcome=outcome, finished_at=utcnow(),
                                       duration=round(elapsed, 3), detail=detail, handed_over=handed_over)
        ctx.metrics.step_duration.labels(step=step.name, outcome=outcome).observe(elapsed)
        log = ctx.log.info if outcome in ("ok", "handed_over", "skipped", "dry_run") else ctx.log.warning
        log("drain step finished", step=step.name, outcome=outcome, duration=round(elapsed, 3), detail=detail)
        self._publish(self._timeline.with_step(finished))

    def _finish(self) -> Timeline:
        ctx = self._ctx
        finished_at = utcnow()
        result = verdict(self._timeline.steps, dry_run=ctx.dry_run)
        slack = (self._timeline.deadline - finished_at).total_seconds()
        counter = ctx.metrics.drains if self._purpose == "drain" else ctx.metrics.restores
        counter.labels(source=ctx.notice.source, result=result).inc()
        ctx.log.info("drain finished", result=result, slack=round(slack, 3))
        self._publish(dataclasses.replace(self._timeline, finished_at=finished_at, result=result))
        return self._timeline
