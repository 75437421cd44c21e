"""The migrate step: requests still running when the local wait is over are continued on peers.

With ``[gate] peers`` set, the gate cuts each one at a whole SSE event and sends a continuation (the
request plus the output so far) to a peer, relaying the peer's answer into the same client response (see
``gate/continuation.py`` and ``gate/stitch.py``). Runs after wait_inflight, so a request that finishes
locally in time never pays a seam, and before the snapshot, which then records each request with the
peer that took it. Without peers the step is skipped and the snapshot step cuts what is left, as before.
"""

from __future__ import annotations

from spotguard.drain.step import DrainContext, StepResult, step_time_left
from spotguard.errors import GateError

MIGRATE_BUDGET = 3.0
"""Seconds for cutting what is in flight at a whole event and handing it over (the relays go on after)."""


class Migrate:
    name = "migrate"
    after: tuple[str, ...] = ("wait_inflight",)
    floor = 0.0

    def budget(self, ctx: DrainContext) -> float:
        return MIGRATE_BUDGET

    async def run(self, ctx: DrainContext) -> str | StepResult:
        journal = ctx.services.journal
        peers = ctx.config.gate.peers
        if journal is None:
            return StepResult("skipped", "no gate in front of the engine")
        if not peers:
            return StepResult("skipped", "no [gate] peers: the snapshot step ends what is still running")
        if ctx.dry_run:
            return StepResult("dry_run", f"would continue what is still running on {len(peers)} peer(s)")
        try:
            handed = await journal.interrupt_and_wait(max(0.05, step_time_left() - 0.2))
        except GateError as exc:
            return StepResult("failed", f"the gate did not answer: {exc}")
        if not handed:
            return "nothing left in flight to migrate"
        continued = sum(1 for entry in handed if entry.migrated_to)
        detail = (f"{continued} request(s) continued on peers: handed over when the drain began (they could not "
                  f"finish here in time) or when the wait ended ({len(peers)} configured; the gate relays their "
                  "answers)")
        if continued < len(handed):
            # Cut without a continuation (n > 1, a tool call under way, no peer took it): the client got a
            # retryable error, as it would without peers. The snapshot step saves them.
            return StepResult("failed", f"{len(handed) - continued} of {len(handed)} request(s) could not be "
                                        f"continued on a peer and ended with a retryable error; {detail}",
                              handed_over=continued)
        return StepResult("ok", detail, handed_over=continued)
