"""What a drain step is, and what it is given.

A step is a small object with a name, the names of the steps it must wait for, a budget, and an
async ``run``. The drain engine runs each step under ``min(budget, time left before the drain
deadline)``; a step that raises or overruns is recorded as failed or timed out and never stops the
steps after it. ``run`` returns a one-line detail for the timeline, or a ``StepResult`` to report
an outcome other than ``ok`` (for example ``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio

from spotguard.drain.timeline import Outcome

if TYPE_CHECKING:
    import httpx
    import structlog

    from spotguard.config import Config
    from spotguard.deadline import Deadline
    from spotguard.drain.timeline import Timeline
    from spotguard.metrics import Metrics
    from spotguard.notice import Notice
    from spotguard.services import Services


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    detail: str = ""
    handed_over: int = 0
    """Requests the step handed to peers (migrate), for the drain's result."""


@dataclass(frozen=True, kw_only=True)
class DrainContext:
    """Everything a step may use. Steps work to ``deadline.drain`` (the notice's deadline less the margin)."""

    config: Config
    notice: Notice
    deadline: Deadline
    dry_run: bool
    metrics: Metrics
    log: structlog.stdlib.BoundLogger
    http: httpx.AsyncClient
    services: Services
    progress: Callable[[], Timeline] | None = None
    """The drain's timeline so far; the engine sets it (the end webhook summarises the outcomes)."""

    def seconds_left(self) -> float:
        """Seconds until the drain must be over."""
        return self.deadline.seconds_left()


class Step(Protocol):
    """A named unit of a drain. ``name`` and ``after`` are read-only (plain class attributes do)."""

    @property
    def name(self) -> str: ...

    @property
    def after(self) -> tuple[str, ...]:
        """Names of the steps that must be done (with any outcome) before this one starts."""
        ...

    @property
    def floor(self) -> float:
        """Seconds the step always gets, even past the drain deadline: the cheap safety steps (readiness,
        stop_accepting, deregister) must run on a late notice; 0 for steps that may be cut."""
        ...

    def budget(self, ctx: DrainContext) -> float: ...

    async def run(self, ctx: DrainContext) -> str | StepResult: ...


def step_time_left() -> float:
    """Seconds until the running step's scope ends (its budget, or an earlier deadline after tighten).

    Inside a step this, not ``ctx.seconds_left()``, is the time a step may still spend: the engine
    moves the scope's deadline when a second, earlier notice arrives.
    """
    return max(0.0, anyio.current_effective_deadline() - anyio.current_time())


TAIL_RESERVE = 2.0
"""Seconds kept at the end of a drain for acknowledge and the end webhook (at most half of what is left).

The open-ended steps (waiting for in-flight requests, the snapshot) stop this long before the drain
deadline, so a drain whose tail takes under a second still ends a second or more before the safety
margin. It was 10% of what is left, which on a short window (a 10 s notice) ended drains 0.4 s before
the margin (bench/drain.py, stuck-engine scenario).
"""


def tail_reserve(seconds_left: float) -> float:
    return max(0.0, min(TAIL_RESERVE, 0.5 * seconds_left))
