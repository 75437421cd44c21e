"""The drain timeline: what each step did and when, as a value the agent persists.

Every transition produces a new ``Timeline``; the engine hands it to ``on_change`` so the agent can
write it atomically to the state directory (as JSON there, and on /status only). After a crash the
agent reads it back with ``Timeline.from_json`` and the engine skips the steps that were done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from spotguard.errors import SpotguardError
from spotguard.notice import parse_rfc3339, rfc3339

Outcome = Literal["ok", "handed_over", "failed", "timed_out", "skipped", "dry_run", "manual"]
"""``handed_over``: the step passed what it had not finished to the next one on purpose (wait_inflight: the
requests still running go to migrate, which continues them on peers); nothing was lost.
``manual``: the step cannot be done by spotguard for this setup and says what an operator must do."""
State = Literal["pending", "running", "done"]
STATES: tuple[State, ...] = ("pending", "running", "done")
OUTCOMES: tuple[Outcome, ...] = ("ok", "handed_over", "failed", "timed_out", "skipped", "dry_run", "manual")
Result = Literal["ok", "handed_over", "failed", "dry_run"]
"""A finished drain: ``ok`` lost nothing; ``handed_over`` lost nothing either, and some requests went to peers
to finish; ``failed``: some step failed or ran out of time; ``dry_run``: nothing was done on purpose."""
RESULTS: tuple[Result, ...] = ("ok", "handed_over", "failed", "dry_run")
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
    handed_over: int = 0
    """Requests the step handed to peers to finish (migrate)."""

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
            "handed_over": self.handed_over,
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
            handed_over=int(data.get("handed_over", 0)),
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
    result: Result | None = None
    """Once finished: see ``Result`` (``verdict`` works it out from the steps)."""
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

    @property
    def handed_over(self) -> int:
        """Requests the drain handed to peers to finish."""
        return sum(record.handed_over for record in self.steps)

    def summary(self) -> str:
        """The result in words: "ok", "ok, with 2 requests handed to peers", "failed: deregister timed_out"."""
        if self.result is None:
            return "running"
        if self.result == "handed_over":
            count = self.handed_over
            return f"ok, with {count} request{'s' if count != 1 else ''} handed to peers"
        if self.result == "failed":
            return "failed: " + ", ".join(f"{r.name} {r.outcome}" for r in self.steps
                                         if r.outcome in ("failed", "timed_out"))
        return "dry run" if self.result == "dry_run" else "ok"

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
                result=_result(data.get("result")),
                steps=tuple(StepRecord.from_json(s) for s in data.get("steps", ())),
            )
        except TimelineError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TimelineError(f"persisted timeline is malformed: {type(exc).__name__}: {exc}") from exc


def verdict(records: Sequence[StepRecord], *, dry_run: bool) -> Result:
    """What a drain (or the part of it in ``records``) came to: a failed or timed-out step is a failure; a
    step that handed requests to peers is not, and is said apart from a drain that had nothing to hand."""
    if any(record.outcome in ("failed", "timed_out") for record in records):
        return "failed"
    if dry_run:
        return "dry_run"
    return "handed_over" if any(record.handed_over for record in records) else "ok"


def _result(value: object) -> Result | None:
    if value is None:
        return None
    if value not in RESULTS:
        raise TimelineError(f"unknown drain result {value!r}")
    return value


def _time(value: object) -> datetime | None:
    return parse_rfc3339(str(value)) if value else None
