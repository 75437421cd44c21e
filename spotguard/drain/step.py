"""What a drain step is, and what it is given.

A step is a small object with a name, the names of the steps it must wait for, a budget, and an
async ``run``. The drain engine runs each step under ``min(budget, time left before the drain
deadline)``; a step that raises or overruns is recorded as failed or timed out and never stops the
steps after it. ``run`` returns a one-line detail for the timeline, or a ``StepResult`` to report
an outcome other than ``ok`` (for example ``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol

from spotguard.notice import utcnow

if TYPE_CHECKING:
    import httpx
    import structlog

    from spotguard.config import Config
    from spotguard.metrics import Metrics
    from spotguard.notice import Notice
    from spotguard.services import Services

Outcome = Literal["ok", "failed", "timed_out", "skipped", "dry_run"]


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class DrainContext:
    """Everything a step may use. ``deadline`` is the notice's deadline minus the safety margin."""

    config: Config
    notice: Notice
    deadline: datetime
    dry_run: bool
    metrics: Metrics
    log: structlog.stdlib.BoundLogger
    http: httpx.AsyncClient
    services: Services

    def seconds_left(self) -> float:
        return (self.deadline - utcnow()).total_seconds()


class Step(Protocol):
    name: str
    after: tuple[str, ...]

    def budget(self, ctx: DrainContext) -> float: ...

    async def run(self, ctx: DrainContext) -> str | StepResult: ...
