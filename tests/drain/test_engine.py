"""The drain engine with the real steps: DAG order, budgets, deadline, tighten, resume, dry run."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from spotguard.deadline import Deadline
from spotguard.drain import STEP_NAMES, DrainEngine, Timeline, plan
from spotguard.drain.step import DrainContext, StepResult
from spotguard.gate.journal import EntryJournal
from spotguard.gate.protocol import JournalEntry
from spotguard.metrics import Metrics
from spotguard.notice import utcnow
from tests.drain.support import (
    FakeBalancer,
    FakeEngine,
    FakeSnapshotter,
    Receiver,
    config,
    context,
    notice,
    receivers,
    seconds_between,
    services,
)

pytestmark = pytest.mark.anyio


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_full_drain_reaches_every_target() -> None:
    engine = FakeEngine(inflight=3, finish_every=0.05)
    lb = FakeBalancer()
    refused: list[bool] = []
    acked: list[str] = []
    snapshot = FakeSnapshotter()

    async def acknowledge(event_id: str) -> str:
        acked.append(event_id)
        return f"approved {event_id}"

    persisted: list[str] = []
    async with receivers(Receiver()) as (hook,):
        cfg = config(urls=[hook.url])
        the_notice = notice(seconds=20, source="azure", kind="Preempt", event_id="C7061BAC")
        svc = services(engine, lb, refuse_new_work=refused.append, acknowledge=acknowledge, snapshot=snapshot)
        metrics = Metrics()
        async with httpx.AsyncClient() as http:
            ctx = context(cfg, the_notice, svc, http, metrics=metrics)
            drain = DrainEngine(plan(cfg), ctx, on_change=lambda t: persisted.append(json.dumps(t.to_json())))
            with anyio.fail_after(10):
                timeline = await drain.run()

    assert [r.name for r in timeline.steps] == list(STEP_NAMES)
    outcomes = {r.name: r.outcome for r in timeline.steps}
    # No [gate] peers: nothing to migrate to, and the snapshot ends what is still running.
    assert outcomes == {**dict.fromkeys(STEP_NAMES, "ok"), "migrate": "skipped"}, timeline.to_json()
    assert refused == [True]  # the gate refuses new work from the readiness step on
    assert acked == ["C7061BAC"]
    assert lb.completed == [] and lb.heartbeats == 0  # an Azure event holds no ASG lifecycle action
    assert len(snapshot.calls) == 1
    assert "no requests in flight" in timeline.step("wait_inflight").detail
    # Start webhook at once, end webhook after the work, both Slack-compatible text.
    assert [d.body["text"].split(":")[0] for d in hook.deliveries] == ["spotguard", "spotguard"]
    assert "draining i-0abc" in hook.deliveries[0].body["text"]
    assert "finished" in hook.deliveries[1].body["text"]
    assert "snapshot ok" in hook.deliveries[1].body["text"]
    # Every transition was handed over; the last one is the finished timeline, and it reads back.
    assert len(persisted) >= 2 * len(STEP_NAMES) + 1
    assert Timeline.from_json(json.loads(persisted[-1])).to_json() == timeline.to_json()
    assert timeline.result == "ok" and timeline.finished_at is not None
    assert sample(metrics, "spotguard_drains_total", source="azure", result="ok") == 1
    assert sample(metrics, "spotguard_drain_step_duration_seconds_count", step="snapshot", outcome="ok") == 1


async def test_stop_accepting_and_deregister_run_concurrently() -> None:
    engine = FakeEngine(stop_delay=0.5)
    lb = FakeBalancer(delay=0.5)
    cfg = config()
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice(seconds=20), services(engine, lb), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx).run()
    stop, dereg = timeline.step("stop_accepting"), timeline.step("deregister")
    assert stop.outcome == dereg.outcome == "ok"
    assert stop.started_at and stop.finished_at and dereg.started_at and dereg.finished_at
    # Each started before the other finished: they overlapped, neither waited for the other.
    assert dereg.started_at < stop.finished_at and stop.started_at < dereg.finished_at
    # wait_inflight starts only once stop_accepting is over.
    assert seconds_between(stop.finished_at, timeline.step("wait_inflight").started_at) >= 0


async def test_hanging_steps_time_out_and_the_drain_still_ends_before_the_deadline() -> None:
    engine = FakeEngine(inflight=1, finish_every=0.0)  # a request that never finishes
    hung_lb = FakeBalancer("hung-lb", hang=True)
    ok_lb = FakeBalancer("ok-lb")

    hanging_snapshot = FakeSnapshotter(hang=True)
    cfg = config(deregister_budget=0.5, wait_inflight_budget=60, snapshot_budget=60)
    the_notice = notice(seconds=4, kind="asg-terminated")  # a notice that holds a lifecycle action
    svc = services(engine, hung_lb, ok_lb, snapshot=hanging_snapshot)
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, the_notice, svc, http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx).run()
    dereg = timeline.step("deregister")
    # Cut by its own budget (not by the drain's deadline), after waiting that budget out.
    assert dereg.outcome == "timed_out" and dereg.duration is not None and dereg.duration >= 0.4
    assert "ok-lb: deregistered" in dereg.detail and "hung-lb: no answer" in dereg.detail
    assert timeline.step("wait_inflight").outcome == "timed_out"
    assert "1 requests still in flight" in timeline.step("wait_inflight").detail
    assert timeline.step("snapshot").outcome == "timed_out"
    # The steps after the hung ones still ran, inside the deadline: the lifecycle action was completed on
    # the balancer that answers, and the hung one (which hangs on every call) was cut at the step's budget.
    assert timeline.step("acknowledge").outcome == "timed_out" and ok_lb.completed == [False]
    assert "hung-lb: no answer" in timeline.step("acknowledge").detail
    assert timeline.step("notify_end").outcome == "skipped"
    # Generous: the tail reserve ends the drain 2 s before this 4 s deadline.
    assert timeline.finished_at is not None and timeline.finished_at < the_notice.deadline
    assert timeline.result == "failed"


async def test_failed_step_never_stops_the_ones_after_it() -> None:
    engine = FakeEngine(fail_stop=True, knows_inflight=False)
    journal = EntryJournal()
    cfg = config()
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice(seconds=10), services(engine, journal=journal), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx).run()
    assert timeline.step("stop_accepting").outcome == "failed"
    assert "EngineError: engine refused to stop" in timeline.step("stop_accepting").detail
    # The gate journal still tells wait_inflight there is nothing running.
    assert timeline.step("wait_inflight").outcome == "ok"
    assert timeline.step("deregister").outcome == "skipped"
    assert timeline.step("deregister").detail == "no load balancer configured"
    assert timeline.step("snapshot").detail == "no snapshot store configured"
    assert all(r.state == "done" for r in timeline.steps)


async def test_wait_inflight_follows_the_gate_journal_and_keeps_time_for_the_snapshot() -> None:
    journal = EntryJournal()
    request = JournalEntry(id="req-00000001", endpoint="/v1/completions", model="m", body=b"{}", stream=True)
    journal.add(request)
    engine = FakeEngine(inflight=0)
    snapshot = FakeSnapshotter()

    cfg = config(wait_inflight_budget=60, snapshot_budget=3)
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice(seconds=6), services(engine, journal=journal, snapshot=snapshot), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx).run()
    waited = timeline.step("wait_inflight")
    assert waited.outcome == "timed_out" and waited.duration is not None
    # 6 s left: wait_inflight keeps 2 s for the tail and half of the other 4 s for the snapshot, so it
    # gives up with well over the tail's 2 s still left for the snapshot, which then runs and succeeds.
    assert waited.duration >= 1.0
    assert snapshot.calls and snapshot.calls[0][1] > 2.5
    assert timeline.step("snapshot").outcome == "ok"

    journal.discard(request.id)


async def test_tighten_moves_running_scopes_to_the_earlier_deadline() -> None:
    slow_snapshot = FakeSnapshotter(hang=True)

    cfg = config(snapshot_budget=60)
    first = notice(seconds=60)
    changes: list[Timeline] = []
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, first, services(FakeEngine(), snapshot=slow_snapshot), http)
        drain = DrainEngine(plan(cfg), ctx, on_change=changes.append)
        result: list[Timeline] = []

        async def run() -> None:
            result.append(await drain.run())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await slow_snapshot.started.wait()
                earlier = Deadline.for_notice(notice(seconds=2.0), cfg.drain.safety_margin)
                assert drain.tighten(earlier) is True
                assert drain.tighten(Deadline.for_notice(notice(seconds=30.0), 0.0)) is False  # never loosens
    timeline = result[0]
    assert timeline.deadline == earlier.drain
    snap = timeline.step("snapshot")
    # Cut at the new deadline: with its 60 s budget it would have run into the test's fail_after(10).
    assert snap.outcome == "timed_out"
    # The snapshot kept the tail's share of the new deadline, so acknowledge and notify_end ran.
    assert timeline.step("acknowledge").outcome == "skipped"
    assert timeline.finished_at is not None and timeline.finished_at <= earlier.drain
    assert any(t.deadline == earlier.drain and not t.done for t in changes)


async def test_resume_never_repeats_finished_steps() -> None:
    engine = FakeEngine(inflight=0)
    lb = FakeBalancer()
    cfg = config()
    the_notice = notice(seconds=20)
    now = utcnow()
    persisted = {
        "version": 1, "notice_key": the_notice.key, "deadline": the_notice.to_json()["deadline"],
        "started_at": now.isoformat(), "finished_at": None, "dry_run": False, "result": None,
        "steps": [
            {"name": "readiness", "state": "done", "outcome": "ok", "started_at": now.isoformat(),
             "finished_at": now.isoformat(), "duration": 0.0, "detail": "marked not ready", "attempts": 1},
            {"name": "stop_accepting", "state": "done", "outcome": "ok", "duration": 0.2, "detail": "stopped",
             "attempts": 1},
            {"name": "deregister", "state": "done", "outcome": "failed", "duration": 1.0, "detail": "denied",
             "attempts": 1},
            {"name": "wait_inflight", "state": "running", "started_at": now.isoformat(), "attempts": 1},
        ],
    }
    resumed = Timeline.from_json(json.loads(json.dumps(persisted)))
    refused: list[bool] = []
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, the_notice, services(engine, lb, refuse_new_work=refused.append), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx, timeline=resumed).run()
    assert engine.stop_calls == [] and lb.deregistered == [] and refused == []
    assert timeline.step("deregister").outcome == "failed"  # kept as it was, not retried
    wait = timeline.step("wait_inflight")
    assert wait.outcome == "ok" and wait.attempts == 2  # left running by the crash: run again
    assert timeline.step("notify_start").attempts == 1
    assert timeline.started_at == resumed.started_at
    assert all(r.state == "done" for r in timeline.steps)


async def test_dry_run_does_nothing_and_says_what_it_would_do() -> None:
    engine = FakeEngine(inflight=2)
    lb = FakeBalancer()
    refused: list[bool] = []
    acked: list[str] = []

    async def acknowledge(event_id: str) -> str:
        acked.append(event_id)
        return "approved"

    snapshot = FakeSnapshotter(refuse=True)

    async with receivers(Receiver()) as (hook,):
        cfg = config(urls=[hook.url])
        svc = services(engine, lb, refuse_new_work=refused.append, acknowledge=acknowledge, snapshot=snapshot)
        async with httpx.AsyncClient() as http:
            ctx = context(cfg, notice(seconds=20, source="azure", kind="Preempt"), svc, http, dry_run=True)
            with anyio.fail_after(10):
                timeline = await DrainEngine(plan(cfg), ctx).run()
        assert hook.requests == 0
    assert {r.outcome for r in timeline.steps if r.name != "migrate"} == {"dry_run"}, timeline.to_json()
    assert timeline.step("migrate").outcome == "skipped"  # no [gate] peers
    assert refused == [] and acked == [] and engine.stopped_at is None
    assert [dry for _, dry in engine.stop_calls] == [True]
    assert [dry for _, _, dry in lb.deregistered] == [True]
    assert lb.completed == []  # an Azure event holds no ASG lifecycle action to complete
    assert "would wait up to" in timeline.step("wait_inflight").detail
    assert "2 in-flight" in timeline.step("snapshot").detail
    assert "SECRET" not in timeline.step("notify_start").detail
    assert timeline.result == "dry_run" and timeline.dry_run


async def test_a_step_that_raises_in_its_budget_and_one_without_time() -> None:
    class Broken:
        name = "broken"
        after: tuple[str, ...] = ()
        floor = 0.0

        def budget(self, ctx: DrainContext) -> float:
            raise ZeroDivisionError("bad budget")

        async def run(self, ctx: DrainContext) -> str | StepResult:
            return StepResult("skipped", "nothing to do")

    cfg = config()
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice(seconds=0), services(FakeEngine()), http)  # deadline already reached
        with anyio.fail_after(5):
            timeline = await DrainEngine([Broken()], ctx).run()
    assert timeline.step("broken").outcome == "timed_out"
    assert timeline.step("broken").detail == "no time left before the drain deadline"


def test_a_plan_with_a_cycle_is_refused() -> None:
    class Loop:
        def __init__(self, name: str, after: str) -> None:
            self.name, self.after = name, (after,)
            self.floor = 0.0

        def budget(self, ctx: DrainContext) -> float:
            return 1.0

        async def run(self, ctx: DrainContext) -> str:
            return ""

    from spotguard.drain import check_plan

    with pytest.raises(ValueError, match="cycle"):
        check_plan([Loop("a", "b"), Loop("b", "a")])
    with pytest.raises(ValueError, match="unknown"):
        check_plan([Loop("a", "zzz")])
    check_plan(plan(config()))
