"""A late notice still runs the safety steps; an unreadable in-flight count is waited on, not skipped; the
undo plan puts back only what the drain did."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.drain import DrainEngine
from spotguard.drain.plan import plan
from spotguard.drain.serving import WaitInflight
from spotguard.drain.step import Outcome
from spotguard.drain.timeline import StepRecord, Timeline
from spotguard.drain.undo import undo_plan
from spotguard.errors import EngineError, ManualActionRequired
from spotguard.gate.journal import EntryJournal
from spotguard.notice import utcnow
from tests.drain.support import FakeBalancer, FakeEngine, config, context, notice, services
from tests.drain.test_steps import Alone

pytestmark = pytest.mark.anyio


class UnreadableEngine(FakeEngine):
    """An engine whose metrics went away once it was told to stop (vLLM's HTTP server shuts down)."""

    async def inflight(self) -> int | None:
        raise EngineError("GET http://127.0.0.1:8000/metrics: connection refused")


class RestartableEngine(FakeEngine):
    def __init__(self, *, manual: bool = False) -> None:
        super().__init__()
        self.manual = manual
        self.resumed: list[bool] = []

    async def resume_accepting(self, *, dry_run: bool) -> str:
        self.resumed.append(dry_run)
        if self.manual:
            raise ManualActionRequired("started by pid: restart the engine by hand")
        return "systemctl start vllm.service"


async def test_a_notice_already_past_its_deadline_still_takes_the_node_out() -> None:
    engine, lb = FakeEngine(inflight=3, finish_every=0), FakeBalancer()
    refused: list[bool] = []
    cfg = config(margin=5.0)
    svc = services(engine, lb, refuse_new_work=refused.append)
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(15):
            timeline = await DrainEngine(plan(cfg), context(cfg, notice(seconds=2), svc, http),
                                         background=()).run()
    outcomes = {step.name: step.outcome for step in timeline.steps}
    assert outcomes["readiness"] == "ok" and refused == [True]
    assert outcomes["stop_accepting"] == "ok" and engine.stopped_at is not None
    assert outcomes["deregister"] == "ok" and lb.deregistered
    assert outcomes["wait_inflight"] == "timed_out"  # only the open-ended steps are cut


async def test_an_unreadable_count_is_waited_on_within_the_budget() -> None:
    cfg = config(wait_inflight_budget=1.0)
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice(seconds=30), services(UnreadableEngine()), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine([Alone(WaitInflight())], ctx, background=()).run()
    step = timeline.step("wait_inflight")
    assert step.outcome == "timed_out" and "unreadable" in step.detail
    assert step.duration is not None and step.duration >= 0.5  # it waited, rather than give up at once


async def test_the_gate_journal_counts_when_the_engine_cannot() -> None:
    async with httpx.AsyncClient() as http:
        ctx = context(config(), notice(seconds=30), services(UnreadableEngine(), journal=EntryJournal()), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine([Alone(WaitInflight())], ctx, background=()).run()
    assert timeline.step("wait_inflight").outcome == "ok"


def _drained(**outcomes: Outcome) -> Timeline:
    return Timeline(notice_key="aws/spot-interruption/evt-1", deadline=utcnow(), started_at=utcnow(),
                    steps=tuple(StepRecord(name=name, state="done", outcome=outcome) for name, outcome in outcomes.items()))


async def test_the_undo_plan_puts_back_only_what_the_drain_did() -> None:
    engine, lb = RestartableEngine(), FakeBalancer()
    refused: list[bool] = []
    svc = services(engine, lb, refuse_new_work=refused.append, journal=EntryJournal())
    async with httpx.AsyncClient() as http:
        ctx = context(config(), notice(seconds=30), svc, http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(undo_plan(_drained(stop_accepting="ok", deregister="skipped")), ctx,
                                         background=(), purpose="restore").run()
    outcomes = {step.name: step.outcome for step in timeline.steps}
    assert outcomes == {"resume_engine": "ok", "reopen_gate": "ok", "register": "skipped"}
    assert engine.resumed == [False] and refused == [False] and not lb.registered
    assert ctx.metrics.restores.labels(source="aws", result="ok")._value.get() == 1


async def test_an_engine_spotguard_cannot_restart_says_so() -> None:
    engine, lb = RestartableEngine(manual=True), FakeBalancer()
    async with httpx.AsyncClient() as http:
        ctx = context(config(), notice(seconds=30), services(engine, lb), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(undo_plan(_drained(stop_accepting="failed", deregister="ok")), ctx,
                                         background=(), purpose="restore").run()
    resume = timeline.step("resume_engine")
    assert resume.outcome == "manual" and "by hand" in resume.detail
    assert timeline.step("register").outcome == "ok" and len(lb.registered) == 1
