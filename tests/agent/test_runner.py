"""The runner's state machine: de-duplication, withdrawal, scheduling, persistence, error handling.

The sources here are scripted lists (the runner's input); the cloud sources themselves are tested against
the emulator in tests/clouds, and the whole daemon end to end in tests/agent/test_daemon.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from spotguard import logs
from spotguard.agent.runner import Agent, Timeline
from spotguard.agent.state import StateStore
from spotguard.config import Config, load
from spotguard.errors import MalformedMetadata
from spotguard.metrics import Metrics
from spotguard.notice import Notice, utcnow

pytestmark = pytest.mark.anyio


class ScriptedSource:
    """Reports whatever the test put in ``live``; raises ``fail`` once if set."""

    hanging = False
    interval: float | None = None

    def __init__(self, name: str = "aws") -> None:
        self.name = name
        self.live: list[Notice] = []
        self.fail: Exception | None = None
        self.polls = 0

    async def poll(self) -> Sequence[Notice]:
        self.polls += 1
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return list(self.live)

    async def aclose(self) -> None:
        return None


class RecordingDriver:
    """Runs a one-step timeline and records what it was asked, the way the drain engine reports."""

    def __init__(self, block: anyio.Event | None = None) -> None:
        self.runs: list[tuple[Notice, bool]] = []
        self.tightened: list[datetime] = []
        self.restores: list[Timeline] = []
        self.block = block

    async def run(self, notice: Notice, timeline: Timeline, *, dry_run: bool,
                  on_change: Callable[[Timeline], None]) -> Timeline:
        self.runs.append((notice, dry_run))
        steps = [{"name": "readiness", "state": "done", "outcome": "ok"}]
        on_change(steps)
        if self.block is not None:
            await self.block.wait()
        return steps

    def tighten(self, deadline: datetime) -> None:
        self.tightened.append(deadline)

    async def restore(self, drained: Timeline, timeline: Timeline, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        self.restores.append(drained)
        steps = [{"name": "reopen_gate", "state": "done", "outcome": "ok"}]
        on_change(steps)
        return steps


def notice(kind: str = "spot-interruption", event_id: str = "e1", seconds: float = 120,
           act_in: float | None = None, action: str = "drain") -> Notice:
    now = utcnow()
    return Notice(source="aws", kind=kind, event_id=event_id, deadline=now + timedelta(seconds=seconds),
                  detected_at=now, action="observe" if action == "observe" else "drain",
                  act_at=now + timedelta(seconds=act_in) if act_in is not None else None)


def make_agent(tmp_path: Path, source: ScriptedSource, driver: RecordingDriver,
               config: Config | None = None) -> Agent:
    logs.configure("json", "error")
    cfg = config or load(None, environ={}, overrides={"agent": {"poll_interval": 0.01, "state_dir": str(tmp_path)}})
    return Agent(config=cfg, cloud="aws", metrics=Metrics(), log=logs.get("test"),
                 store=StateStore(tmp_path), sources=[source], driver=driver)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def test_notice_drains_once_and_persists(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.state == "drained")
        polls = source.polls
        await until(lambda: source.polls > polls + 5)  # the same notice keeps being reported
        tg.cancel_scope.cancel()
    assert len(driver.runs) == 1
    saved, problem = StateStore(tmp_path).load()
    assert problem is None and saved.state == "drained" and saved.notice and saved.notice.event_id == "e1"
    assert agent.metrics.notices.labels(source="aws", kind="spot-interruption", action="drain")._value.get() == 1


async def test_observe_notice_never_drains(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(kind="rebalance-recommendation", action="observe")]
        await until(lambda: agent.status()["observed"])
        tg.cancel_scope.cancel()
    assert agent.state == "serving" and driver.runs == []


async def test_scheduled_notice_withdrawn_before_due_is_cancelled(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(kind="scheduled-event", act_in=0.4, seconds=600)]
        await until(lambda: agent.live_notices())
        source.live = []
        await until(lambda: not agent.live_notices())
        await anyio.sleep(0.6)  # past act_at: nothing may start (a negative check needs a wait)
        tg.cancel_scope.cancel()
    assert agent.state == "serving" and driver.runs == []
    assert agent.metrics.withdrawals.labels(source="aws", kind="scheduled-event")._value.get() == 1


async def test_scheduled_notice_starts_at_act_at(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        scheduled = notice(kind="scheduled-event", act_in=0.3, seconds=600)
        source.live = [scheduled]
        await until(lambda: agent.state == "drained")
        tg.cancel_scope.cancel()
    assert scheduled.act_at is not None and utcnow() >= scheduled.act_at


async def test_earlier_second_notice_tightens_without_restarting(tmp_path: Path) -> None:
    source, block = ScriptedSource(), anyio.Event()
    driver = RecordingDriver(block)
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(event_id="late", seconds=300)]
        await until(lambda: agent.state == "draining")
        source.live = [notice(event_id="late", seconds=300), notice(kind="scheduled-event", event_id="soon", seconds=60)]
        await until(lambda: driver.tightened)
        block.set()
        await until(lambda: agent.state == "drained")
        tg.cancel_scope.cancel()
    assert len(driver.runs) == 1
    assert agent.notice is not None and agent.notice.seconds_left() < 61


async def test_errors_are_counted_and_polling_continues(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.fail = MalformedMetadata("bad JSON", reason="bad_json")
        await until(lambda: agent.health()["aws"]["errors"] == 1)
        source.fail = ZeroDivisionError("a bug in a source")
        await until(lambda: agent.health()["aws"]["errors"] == 2)
        source.live = [notice()]
        await until(lambda: agent.state == "drained")
        tg.cancel_scope.cancel()
    assert agent.metrics.poll_errors.labels(source="aws", reason="bad_json")._value.get() == 1
    assert agent.metrics.poll_errors.labels(source="aws", reason="internal")._value.get() == 1


async def test_restart_while_draining_resumes_and_unreadable_state_serves(tmp_path: Path) -> None:
    source, block = ScriptedSource(), anyio.Event()
    agent = make_agent(tmp_path, source, RecordingDriver(block))
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.state == "draining")
        tg.cancel_scope.cancel()  # the daemon dies mid-drain
    driver = RecordingDriver()
    restarted = make_agent(tmp_path, ScriptedSource(), driver)
    assert restarted.state == "draining"
    async with anyio.create_task_group() as tg:
        await tg.start(restarted.run)
        await until(lambda: restarted.state == "drained")
        tg.cancel_scope.cancel()
    assert driver.runs[0][0].event_id == "e1"
    (tmp_path / "state.json").write_text("{not json")
    assert make_agent(tmp_path, ScriptedSource(), RecordingDriver()).state == "serving"


async def test_manual_drain_and_undrain_rules(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        dry = await agent.manual_drain("try", 30, dry_run=True)
        assert dry["dry_run"] and agent.state == "serving" and driver.runs[-1][1] is True
        result = await agent.manual_drain("maintenance", 30, dry_run=False)
        assert result["accepted"]
        await until(lambda: agent.state == "drained")
        assert (await agent.undrain(force=False))["accepted"]
        assert agent.state == "serving"
        source.live = [notice()]
        await until(lambda: agent.state == "drained")
        refused = await agent.undrain(force=False)
        assert not refused["accepted"] and "cloud notice" in refused["message"]
        assert (await agent.undrain(force=True))["accepted"]
        polls = source.polls
        await until(lambda: source.polls > polls + 5)  # the forced-away notice does not drain again
        assert agent.state == "serving"
        tg.cancel_scope.cancel()


async def test_forced_undrain_stops_a_running_drain_so_its_end_does_not_undo_it(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    driver.block = anyio.Event()  # the drain is still in a step (e.g. acknowledging) when the operator steps in
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.state == "draining")
        waiting_on_drain = anyio.Event()

        drain_done = agent.wait_drained()  # what the SIGTERM handler holds while the drain runs

        async def sigterm_waiter() -> None:
            await drain_done
            waiting_on_drain.set()

        tg.start_soon(sigterm_waiter)
        assert not (await agent.undrain(force=False))["accepted"]
        assert (await agent.undrain(force=True))["accepted"]
        driver.block.set()  # had the drain not been stopped, it would now finish and mark the node drained
        with anyio.fail_after(5):
            await waiting_on_drain.wait()
        polls = source.polls
        await until(lambda: source.polls > polls + 5)
        assert agent.state == "serving"
        assert agent.metrics.drains.labels(source="aws", result="cancelled")._value.get() == 1
        tg.cancel_scope.cancel()


async def test_forced_undrain_after_the_last_step_still_wins(tmp_path: Path) -> None:
    # The undrain lands after the drain's last await: no checkpoint is left in the steps to deliver the cancel.
    source = ScriptedSource()
    agent: Agent | None = None

    class UndrainAtTheEnd(RecordingDriver):
        async def run(self, notice: Notice, timeline: Timeline, *, dry_run: bool,
                      on_change: Callable[[Timeline], None]) -> Timeline:
            steps = await super().run(notice, timeline, dry_run=dry_run, on_change=on_change)
            assert agent is not None
            await agent.undrain(force=True)  # no await inside: runs to completion without yielding
            return steps

    agent = make_agent(tmp_path, source, UndrainAtTheEnd())
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.metrics.drains.labels(source="aws", result="cancelled")._value.get() == 1)
        assert agent.state == "serving"
        tg.cancel_scope.cancel()


async def test_a_forced_undrain_is_remembered_across_a_restart(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.state == "drained")
        assert (await agent.undrain(force=True))["accepted"]
        assert agent.state == "serving" and driver.restores  # the undo plan ran
        tg.cancel_scope.cancel()
    # The daemon restarts (an upgrade) while the cloud still reports the notice the operator overrode.
    source, driver = ScriptedSource(), RecordingDriver()
    source.live = [notice()]
    restarted = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(restarted.run)
        await until(lambda: source.polls > 5)
        assert restarted.state == "serving" and not driver.runs
        source.live = []  # withdrawn: the override is dropped with it
        await until(lambda: not restarted.suppressed)
        tg.cancel_scope.cancel()
    saved, _ = StateStore(tmp_path).load()
    assert saved.suppressed == ()


async def test_a_notice_coming_due_during_a_restore_stops_it_and_drains(tmp_path: Path) -> None:
    source = ScriptedSource()

    class SlowRestore(RecordingDriver):
        async def restore(self, drained: Timeline, timeline: Timeline, *,
                          on_change: Callable[[Timeline], None]) -> Timeline:
            await anyio.sleep_forever()  # an engine unit that takes minutes to start
            return []

    driver = SlowRestore()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        await agent.manual_drain("maintenance", 30, dry_run=False)
        await until(lambda: agent.state == "drained")
        tg.start_soon(agent.undrain, False)
        await until(lambda: agent.state == "restoring")
        source.live = [notice()]
        await until(lambda: agent.state == "drained" and len(driver.runs) == 2)
        tg.cancel_scope.cancel()
