"""The snapshot step: save the context of requests still in flight, so another replica can resume them."""

from __future__ import annotations

from spotguard.drain.serving import inflight_count
from spotguard.drain.step import DrainContext, StepResult, tail_reserve


class Snapshot:
    name = "snapshot"
    after: tuple[str, ...] = ("migrate",)
    floor = 0.0

    def budget(self, ctx: DrainContext) -> float:
        left = ctx.seconds_left()
        return max(0.0, min(ctx.config.drain.snapshot_budget, left - tail_reserve(left)))

    async def run(self, ctx: DrainContext) -> str | StepResult:
        save = ctx.services.snapshot
        if save is None:
            return StepResult("skipped", "no snapshot store configured")
        if ctx.dry_run:
            count = (await inflight_count(ctx)).count
            shown = "an unknown number of" if count is None else str(count)
            return StepResult("dry_run", f"would save the context of {shown} in-flight requests "
                                         f"to {ctx.config.snapshot.url or 'the snapshot store'}")
        return await save(ctx)
