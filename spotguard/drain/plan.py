"""The drain plan: which steps run, and what each waits for.

    readiness ─┐
    stop_accepting ── wait_inflight ── migrate ── snapshot ─┬─ acknowledge
    deregister ─┘                                           └─ notify_end
    notify_start

Steps without a path between them run at the same time: stop_accepting never waits for
deregister, and a slow webhook never holds anything up.
"""

from __future__ import annotations

from spotguard.config import Config
from spotguard.drain.balancers import Acknowledge, Deregister
from spotguard.drain.migrate import Migrate
from spotguard.drain.notify import Notify
from spotguard.drain.serving import Readiness, StopAccepting, WaitInflight
from spotguard.drain.snapshot import Snapshot
from spotguard.drain.step import Step

STEP_NAMES = ("readiness", "notify_start", "stop_accepting", "deregister", "wait_inflight", "migrate", "snapshot",
              "acknowledge", "notify_end")


def plan(config: Config) -> list[Step]:
    """Every step of a drain, in display order. ``config`` is where budgets come from at run time."""
    del config  # every step reads its budget and targets from the context, so the plan is fixed
    return [Readiness(), Notify("start"), StopAccepting(), Deregister(), WaitInflight(), Migrate(), Snapshot(),
            Acknowledge(), Notify("end")]
