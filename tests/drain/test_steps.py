"""Single steps, run by the engine, where their choice depends on the cloud and the configuration."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.config import Config
from spotguard.drain import DrainContext, DrainEngine, Step, StepResult, Timeline, plan
from spotguard.drain.balancers import Acknowledge, Deregister
from spotguard.drain.serving import WaitInflight, inflight_count
from spotguard.drain.timeline import StepRecord
from spotguard.drain.undo import undo_plan
from spotguard.errors import MetadataUnavailable
from spotguard.gate.journal import EntryJournal
from spotguard.gate.protocol import JournalEntry
from spotguard.notice import Notice, utcnow
from spotguard.servers import build_engine
from spotguard.services import Services
from tests.drain.support import FakeBalancer, FakeEngine, config, context, notice, services
from tests.support.engines import StartEngine

pytestmark = pytest.mark.anyio


class Alone:
    """The step itself, without the steps it normally waits for."""

    after: tuple[str, ...] = ()

    def __init__(self, step: Step) -> None:
        self.step = step
        self.name = step.name
        self.floor = step.floor

    def budget(self, ctx: DrainContext) -> float:
        return self.step.budget(ctx)

    async def run(self, ctx: DrainContext) -> str | StepResult:
        return await self.step.run(ctx)


async def run_one(step: Step, cfg: Config, the_notice: Notice, svc: Services) -> Timeline:
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            return await DrainEngine([Alone(step)], context(cfg, the_notice, svc, http), background=()).run()


async def test_acknowledge_only_approves_azure_events_when_configured() -> None:
    approved: list[str] = []

    async def approve(event_id: str) -> str:
        approved.append(event_id)
        return f"approved {event_id}"

    svc = services(FakeEngine(), acknowledge=approve)
    aws = await run_one(Acknowledge(), config(), notice(source="aws"), svc)
    assert aws.step("acknowledge").outcome == "skipped"
    assert aws.step("acknowledge").detail == ("nothing to acknowledge: a aws notice has no approval call "
                                              "and no lifecycle action is pending (only an ASG termination, "
                                              "asg-terminated, holds one)")
    off = config().replace("azure", acknowledge=False)
    azure_off = await run_one(Acknowledge(), off, notice(source="azure", kind="Preempt"), svc)
    assert "[azure] acknowledge is off" in azure_off.step("acknowledge").detail
    assert approved == []
    azure = await run_one(Acknowledge(), config(), notice(source="azure", kind="Preempt", event_id="E-1"), svc)
    assert azure.step("acknowledge").outcome == "ok" and approved == ["E-1"]


async def test_a_failed_approval_is_reported_and_holds_no_lifecycle_action() -> None:
    async def approve(event_id: str) -> str:
        raise MetadataUnavailable("POST scheduledevents: HTTP 500")

    lb = FakeBalancer("asg-hook")
    svc = services(FakeEngine(), lb, acknowledge=approve)
    timeline = await run_one(Acknowledge(), config(), notice(source="azure", kind="Preempt"), svc)
    step = timeline.step("acknowledge")
    assert step.outcome == "failed"
    assert step.detail == "azure: MetadataUnavailable: POST scheduledevents: HTTP 500"
    assert lb.completed == []  # an Azure event holds no ASG lifecycle action


@pytest.mark.parametrize(("kind", "completed"), [("asg-terminated", [False]), ("spot-interruption", []),
                                                 ("scheduled-event", []), ("rebalance-recommendation", [])])
async def test_lifecycle_actions_are_completed_and_heartbeated_only_for_an_asg_termination(
        kind: str, completed: list[bool]) -> None:
    lb = FakeBalancer("aws")
    svc = services(FakeEngine(), lb)
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            # The default background: lifecycle heartbeats beside the step.
            timeline = await DrainEngine([Alone(Acknowledge())], context(config(), notice(kind=kind), svc, http)).run()
    step = timeline.step("acknowledge")
    assert lb.completed == completed
    assert (lb.heartbeats >= 1) == bool(completed)
    if completed:
        assert step.outcome == "ok" and step.detail == "aws: no lifecycle hook configured"
    else:
        assert step.outcome == "skipped" and "no lifecycle action is pending" in step.detail


async def test_wait_inflight_without_any_count_does_not_wait() -> None:
    svc = services(FakeEngine(knows_inflight=False))
    timeline = await run_one(WaitInflight(), config(), notice(), svc)
    step = timeline.step("wait_inflight")
    assert step.outcome == "skipped"  # at once: skipping is decided on the first reading, not after a wait
    assert "cannot report in-flight requests" in step.detail


async def test_requests_queued_in_llama_server_count_through_the_gate_journal(start_engine: StartEngine) -> None:
    # llama-server's /slots sees only requests holding a slot; those queued for one are still in flight
    # through the gate, and wait_inflight must see them too.
    engine = await start_engine("llamacpp", "--slots", "2")
    await engine.set_inflight(2)
    journal = EntryJournal()
    for n in range(5):
        journal.add(JournalEntry(id=f"req-{n:08d}", endpoint="/completion", model="tiny", body=b"{}", stream=True))
    async with httpx.AsyncClient() as http:
        cfg = Config().replace("server", kind="llamacpp", url=engine.url)
        svc = services(build_engine(cfg, http), journal=journal)  # type: ignore[arg-type]
        ctx = context(cfg, notice(), svc, http)
        with anyio.fail_after(10):
            assert (await inflight_count(ctx)).count == 5
            for request in list(journal)[:4]:
                journal.discard(request.id)
            assert (await inflight_count(ctx)).count == 2


async def test_deregister_reports_a_refusing_balancer_and_still_leaves_the_others() -> None:
    refusing, ok = FakeBalancer("refusing-lb", fail=True), FakeBalancer("ok-lb")
    timeline = await run_one(Deregister(), config(), notice(), services(FakeEngine(), refusing, ok))
    step = timeline.step("deregister")
    assert step.outcome == "failed"
    assert "refusing-lb" in step.detail and "AccessDenied" in step.detail and "ok-lb: deregistered" in step.detail
    assert [dry for _, _, dry in ok.deregistered] == [False]


async def test_a_hanging_balancer_is_cut_at_the_deregister_budget_and_later_steps_still_run() -> None:
    hung, ok = FakeBalancer("hung-lb", hang=True), FakeBalancer("ok-lb")
    cfg = config(deregister_budget=0.5)
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice(seconds=30, kind="asg-terminated"), services(FakeEngine(), hung, ok), http)
        # Cut by the step's 0.5 s budget: a deregister that waited for the hung API would run into this
        # hang guard instead.
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx).run()
    dereg = timeline.step("deregister")
    assert dereg.outcome == "timed_out"
    assert "hung-lb: no answer" in dereg.detail and "ok-lb: deregistered" in dereg.detail
    assert all(record.state == "done" for record in timeline.steps), timeline.to_json()
    # The steps that wait for deregister ran after it was cut, the lifecycle action on the answering one too.
    acknowledge = timeline.step("acknowledge")
    assert dereg.finished_at is not None and acknowledge.started_at is not None
    assert dereg.finished_at <= acknowledge.started_at and ok.completed == [False]
    assert timeline.step("notify_end").outcome is not None


async def test_undrain_re_registers_where_it_can_and_reports_a_refusing_balancer() -> None:
    refusing, ok = FakeBalancer("refusing-lb", fail=True), FakeBalancer("ok-lb")
    drained = Timeline(notice_key="aws/spot-interruption/evt-1", deadline=utcnow(), started_at=utcnow(),
                       steps=(StepRecord(name="stop_accepting", state="done", outcome="ok"),
                              StepRecord(name="deregister", state="done", outcome="ok")))
    async with httpx.AsyncClient() as http:
        ctx = context(config(), notice(), services(FakeEngine(), refusing, ok), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(undo_plan(drained), ctx, background=(), purpose="restore").run()
    register = timeline.step("register")
    assert register.outcome == "failed" and "RegisterTargets: AccessDenied" in register.detail
    assert ok.registered == [False]
    assert all(record.state == "done" for record in timeline.steps), timeline.to_json()
