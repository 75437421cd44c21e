"""The snapshot step: save the context of requests still in flight, so another replica can resume them.

The step owns what it reads and what it tells the gate: on llama.cpp it lists the busy slots; it cuts what
still runs (the gate settles each at once: output final, the engine's slot free; with peers it continues
them there instead), so that a request is never both answered here and resumable from its record, and the
records and the saved KV hold the same tokens; it hands everything to the store (``storage/snapshot.py``)
with a deadline, and tells the gate to forget the cut requests whose records were stored.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import anyio
import structlog

from spotguard.drain.serving import inflight_count
from spotguard.drain.step import DrainContext, StepResult, step_time_left, tail_reserve
from spotguard.errors import EngineError, GateError, StoreError
from spotguard.gate.journal import JournalAccess
from spotguard.gate.protocol import JournalEntry
from spotguard.servers.llamacpp import SlotApi
from spotguard.storage.job import report_problem
from spotguard.storage.snapshot import Inflight, SnapshotResult, Snapshotter, manifest_reserve

SAFETY = 0.05
"""Seconds kept back from the budget so our own scopes end before the engine's."""
SLOTS_TIMEOUT = 1.0
RELEASE_RESERVE = 0.5
"""Most seconds kept after the save (at most a tenth of the step's time) for telling the gate which cut
requests it may forget; a release that takes longer is given up, and the snapshot keeps its outcome."""


class Snapshot:
    name = "snapshot"
    after: tuple[str, ...] = ("migrate",)
    floor = 0.0

    def budget(self, ctx: DrainContext) -> float:
        left = ctx.seconds_left()
        return max(0.0, min(ctx.config.drain.snapshot_budget, left - tail_reserve(left)))

    async def run(self, ctx: DrainContext) -> str | StepResult:
        snapshotter = ctx.services.snapshot
        if snapshotter is None:
            return StepResult("skipped", "no snapshot store configured")
        if ctx.dry_run:
            count = (await inflight_count(ctx)).count
            shown = "an unknown number of" if count is None else str(count)
            return StepResult("dry_run", f"would save the context of {shown} in-flight requests "
                                         f"to {ctx.config.snapshot.url or 'the snapshot store'}")
        return await take_snapshot(ctx, snapshotter)


async def take_snapshot(ctx: DrainContext, snapshotter: Snapshotter) -> str:
    """Save what is in flight within the step's time; returns a one-line detail.

    Raises ``StoreError`` (after a manifest attempt) when records or the manifest could not be stored.
    """
    config = ctx.config
    total = min(step_time_left(), ctx.seconds_left(), config.drain.snapshot_budget) - SAFETY
    if total <= 0:
        raise StoreError("no time left for a snapshot")
    end = anyio.current_time() + total
    budget = total - min(RELEASE_RESERVE, 0.1 * total)  # the save's; the release of the cut requests has the rest
    deadline = end - (total - budget)
    server = config.server
    kv = SlotApi(ctx.http, server.url) if server.kind == "llamacpp" and server.url else None
    # Reading may take what the store's work would have had, never the manifest's slice.
    reading = _Reading(ctx)
    with anyio.move_on_after(budget - manifest_reserve(budget)) as scope:
        await reading.read(kv, budget)
    if scope.cancelled_caught:
        reading.problem("timeout", f"reading the requests in flight took the snapshot's {budget:.1f}s budget")
    inflight = reading.result()
    instance = ctx.services.identity.instance_id or config.agent.instance_id or socket.gethostname()
    result = await snapshotter.save(inflight, kv=kv, notice=ctx.notice, instance=instance, deadline=deadline,
                                    log=ctx.log, metrics=ctx.metrics)
    if ctx.services.journal is not None and not reading.counted:
        # Not even the count came back: "0/0 records" would pass off an unread gate as an idle one.
        raise StoreError(f"snapshot {result.where} incomplete: the gate's requests could not be read, so how many "
                         f"were in flight is unknown ({'; '.join(reading.problems)}); the manifest says so")
    if ctx.services.journal is not None:
        # By the step's end, also when a tightened deadline moved it since.
        await _release(ctx.services.journal, [r.id for r in inflight.requests if r.id in result.stored_request_ids],
                       by=min(end, anyio.current_effective_deadline() - SAFETY), log=ctx.log)
    return _detail(result)


async def _release(journal: JournalAccess, stored: list[str], *, by: float, log: structlog.stdlib.BoundLogger) -> None:
    """Tell the gate it may forget the cut requests whose records are ``stored``, giving up at ``by``.

    The gate keeps the requests it cut until then; a gate that is gone has forgotten them anyway, and one too
    slow to answer keeps them a while: neither changes what the snapshot stored, so neither fails the step.
    """
    with anyio.CancelScope(deadline=by) as scope:
        try:
            await journal.release(stored)
        except GateError as exc:
            log.info("snapshot.release_failed", requests=len(stored), error=str(exc))
    if scope.cancelled_caught:
        log.warning("snapshot.release_timed_out", requests=len(stored),
                        error="the gate did not answer before the snapshot step's time ran out")


@dataclass
class _Reading:
    """What the step read so far: kept when the reading is cut at the budget."""

    ctx: DrainContext
    count: int = 0
    counted: bool = False
    """The gate answered how many requests it has (without it, a 0 would be a guess)."""
    busy: list[int] = field(default_factory=list)
    requests: list[JournalEntry] | None = None
    problems: list[str] = field(default_factory=list)

    def problem(self, reason: str, message: str) -> None:
        """Record, log and count a problem (``report_problem``)."""
        report_problem(self.problems, reason, message, metrics=self.ctx.metrics, log=self.ctx.log)

    async def read(self, kv: SlotApi | None, budget: float) -> None:
        """The busy slots before the cut (a cut slot is free), then the requests; a part that fails is a
        problem the snapshot reports, never a reason to skip the rest."""
        journal = self.ctx.services.journal
        try:
            if journal is not None:
                self.count = await journal.count()
                self.counted = True
            if kv is not None:
                try:
                    self.busy = [s.id for s in await kv.slots(timeout=SLOTS_TIMEOUT) if s.is_processing]
                except EngineError as exc:
                    self.problem("engine", f"engine slots: {exc}")
            if journal is not None:
                # Whatever still runs is cut (or, with peers, continued there) before it is recorded: a request is
                # never both answered here and resumable from its record, which would compute it twice. On
                # llama.cpp the cut also frees the slot, so the record and the saved KV hold the same tokens.
                settle = min(1.0, 0.1 * (budget - manifest_reserve(budget)))
                self.requests = await journal.interrupt_and_wait(settle)
        except GateError as exc:
            # The requests stay unread (None), not none (an empty list): the count read before stands, so the
            # snapshot says how many it lost instead of 0/0.
            self.problem("gate", f"gate journal: {exc}")

    def result(self) -> Inflight:
        requests = self.requests or []
        return Inflight(requests=requests, count=self.count if self.requests is None else len(requests),
                        busy_slots=self.busy, problems=self.problems)


def _detail(result: SnapshotResult) -> str:
    if result.kept_earlier:
        return f"{result.where}: nothing in flight now; kept the manifest an earlier attempt wrote"
    records = len(result.stored_request_ids)
    summary = f"{records}/{result.requests} records, {result.kv_slots} kv slots, {result.missing} missing"
    if result.manifest_error or records < result.requests:
        problems = "; ".join([*result.errors, *([result.manifest_error] if result.manifest_error else [])])
        raise StoreError(f"snapshot {result.where} incomplete ({summary}): {problems or 'records not stored'}")
    complete = not result.missing and not result.errors
    return f"{result.where}: {summary}" + ("" if complete else f" ({'; '.join(result.errors) or 'see manifest'})")
