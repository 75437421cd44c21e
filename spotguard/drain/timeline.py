"""The drain timeline: what each step did and when, as a value the runner persists.

Every transition produces a new ``Timeline``; the engine hands it to ``on_change`` so the runner
can write it atomically to the state directory. After a crash the runner loads it back with
``Timeline.from_json`` and the engine skips the steps that were done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from spotguard.errors import SpotguardError
from spotguard.notice import parse_rfc3339, rfc3339

Outcome = Literal["ok", "failed", "timed_out", "skipped", "dry_run", "manual"]
"""``manual``: the step cannot be done by spotguard for this setup and says what an operator must do."""
State = Literal["pending", "running", "done"]
STATES: tuple[State, ...] = ("pending", "running", "done")
OUTCOMES: tuple[Outcome, ...] = ("ok", "failed", "timed_out", "skipped", "dry_run", "manual")
FORMAT_VERSION = 1


class TimelineError(SpotguardError):
    """A persisted timeline could not be read back (the runner then starts a fresh drain)."""


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    name: str
    after: tuple[str, ...] = ()
    state: State = "pending"
    outcome: Outcome | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration: float | None = None
    """Seconds the step ran (monotonic clock), rounded to the millisecond."""
    detail: str = ""
    attempts: int = 0
    """How often the step was started; more than 1 after a crash left it running."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "after": list(self.after),
            "state": self.state,
            "outcome": self.outcome,
            "started_at": rfc3339(self.started_at) if self.started_at else None,
            "finished_at": rfc3339(self.finished_at) if self.finished_at else None,
            "duration": self.duration,
            "detail": self.detail,
            "attempts": self.attempts,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepRecord:
        state = data.get("state", "pending")
        outcome = data.get("outcome")
        if state not in STATES:
            raise TimelineError(f"step {data.get('name')!r}: unknown state {state!r}")
        if outcome is not None and outcome not in OUTCOMES:
            raise TimelineError(f"step {data.get('name')!r}: unknown outcome {outcome!r}")
        duration = data.get("duration")
        return cls(
            name=str(data["name"]),
            after=tuple(str(a) for a in data.get("after", ())),
            state=cast(State, state),
            outcome=cast(Outcome | None, outcome),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            duration=float(duration) if duration is not None else None,
            detail=str(data.get("detail", "")),
            attempts=int(data.get("attempts", 0)),
        )


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """One drain: its deadline, and a record per planned step (in plan order)."""

    notice_key: str
    deadline: datetime
    """The drain deadline (notice deadline minus the safety margin); moves earlier on tighten."""
    started_at: datetime
    dry_run: bool = False
    finished_at: datetime | None = None
    result: str | None = None
    """ok, failed (some step failed or timed out) or dry_run, once finished."""
    steps: tuple[StepRecord, ...] = ()

    def step(self, name: str) -> StepRecord:
        for record in self.steps:
            if record.name == name:
                return record
        raise KeyError(name)

    def with_step(self, record: StepRecord) -> Timeline:
        steps = tuple(record if r.name == record.name else r for r in self.steps)
        return dataclasses.replace(self, steps=steps)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "notice_key": self.notice_key,
            "deadline": rfc3339(self.deadline),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at) if self.finished_at else None,
            "dry_run": self.dry_run,
            "result": self.result,
            "steps": [record.to_json() for record in self.steps],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Timeline:
        """Read a persisted timeline; anything malformed raises ``TimelineError``."""
        try:
            if data.get("version") != FORMAT_VERSION:
                raise TimelineError(f"timeline format {data.get('version')!r} is not {FORMAT_VERSION}")
            return cls(
                notice_key=str(data["notice_key"]),
                deadline=parse_rfc3339(str(data["deadline"])),
                started_at=parse_rfc3339(str(data["started_at"])),
                finished_at=_time(data.get("finished_at")),
                dry_run=bool(data.get("dry_run", False)),
                result=str(data["result"]) if data.get("result") is not None else None,
                steps=tuple(StepRecord.from_json(s) for s in data.get("steps", ())),
            )
        except TimelineError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TimelineError(f"persisted timeline is malformed: {type(exc).__name__}: {exc}") from exc


def _time(value: object) -> datetime | None:
    return parse_rfc3339(str(value)) if value else None
