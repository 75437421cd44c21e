"""The agent: de-duplication, withdrawal, scheduling, the node's state machine, persistence, the deadline's
owner, error handling.

The sources here are scripted lists (the agent's input); the cloud sources themselves are tested against
the emulator in tests/clouds, and the whole daemon end to end in tests/agent/test_daemon.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from spotguard import logs
from spotguard.agent import node as node_module
from spotguard.agent.runner import Agent
from spotguard.agent.state import Persisted, StateStore
from spotguard.config import Config, load
from spotguard.deadline import Deadline
from spotguard.drain.timeline import StepRecord, Timeline
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


def finished(notice_key: str, deadline: datetime, step: str, *, dry_run: bool = False) -> Timeline:
    """A one-step timeline, finished, as the drain engine reports one."""
    now = utcnow()
    record = StepRecord(name=step, state="done", outcome="dry_run" if dry_run else "ok", started_at=now,
                        finished_at=now, duration=0.0, attempts=1)
    return Timeline(notice_key=notice_key, deadline=deadline, started_at=now, dry_run=dry_run, finished_at=now,
                    result="dry_run" if dry_run else "ok", steps=(record,))


class RecordingDriver:
    """Runs a one-step timeline and records what it was asked, the way the drain engine reports."""

    def __init__(self, block: anyio.Event | None = None) -> None:
        self.runs: list[tuple[Notice, bool]] = []
        self.deadlines: list[Deadline] = []
        self.resumed: list[Timeline | None] = []
        self.tightened: list[Deadline] = []
        self.restores: list[Timeline | None] = []
        self.block = block

    async def run(self, notice: Notice, deadline: Deadline, resumed: Timeline | None, *, dry_run: bool,
                  on_change: Callable[[Timeline], None]) -> Timeline:
        self.runs.append((notice, dry_run))
        self.deadlines.append(deadline)
        self.resumed.append(resumed)
        timeline = finished(notice.key, deadline.drain, "readiness", dry_run=dry_run)
        on_change(timeline)
        if self.block is not None:
            await self.block.wait()
        return timeline

    def tighten(self, deadline: Deadline) -> None:
        self.tightened.append(deadline)

    async def restore(self, drained: Timeline | None, resumed: Timeline | None, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        self.restores.append(drained)
        timeline = finished("undrain/undrain/x", utcnow(), "reopen_gate")
        on_change(timeline)
        return timeline


def notice(kind: str = "spot-interruption", event_id: str = "e1", seconds: float = 120,
           act_in: float | None = None, action: str = "drain") -> Notice:
    now = utcnow()
    return Notice(source="aws", kind=kind, event_id=event_id, deadline=now + timedelta(seconds=seconds),
                  detected_at=now, action="observe" if action == "observe" else "drain",
                  act_at=now + timedelta(seconds=act_in) if act_in is not None else None)


def make_agent(tmp_path: Path, source: ScriptedSource, driver: RecordingDriver,
               config: Config | None = None, store: StateStore | None = None) -> Agent:
    logs.configure("json", "error")
    cfg = config or load(None, environ={}, overrides={"agent": {"poll_interval": 0.01, "state_dir": str(tmp_path)}})
    return Agent(config=cfg, cloud="aws", metrics=Metrics(), log=logs.get("test"),
                 store=store or StateStore(tmp_path), sources=[source], driver=driver)


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
        await until(lambda: agent.node.state == "drained")
        polls = source.polls
        await until(lambda: source.polls > polls + 5)  # the same notice keeps being reported
        tg.cancel_scope.cancel()
    assert len(driver.runs) == 1
    saved, problem = StateStore(tmp_path).load()
    assert problem is None and saved.state == "drained" and saved.notice and saved.notice.event_id == "e1"
    assert agent.metrics.notices.labels(source="aws", kind="spot-interruption", action="drain")._value.get() == 1
    assert 100 < agent.metrics.drain_slack._value.get() < 120  # to the VM's deadline, at the drain's end


async def test_observe_notice_never_drains(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(kind="rebalance-recommendation", action="observe")]
        await until(lambda: agent.operator.status()["observed"])
        tg.cancel_scope.cancel()
    assert agent.node.state == "serving" and driver.runs == []


async def test_scheduled_notice_withdrawn_before_due_is_cancelled(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(kind="scheduled-event", act_in=0.4, seconds=600)]
        await until(lambda: agent.notices.live())
        source.live = []
        await until(lambda: not agent.notices.live())
        await anyio.sleep(0.6)  # past act_at: nothing may start (a negative check needs a wait)
        tg.cancel_scope.cancel()
    assert agent.node.state == "serving" and driver.runs == []
    assert agent.metrics.withdrawals.labels(source="aws", kind="scheduled-event")._value.get() == 1


async def test_scheduled_notice_starts_at_act_at(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        scheduled = notice(kind="scheduled-event", act_in=0.3, seconds=600)
        source.live = [scheduled]
        await until(lambda: agent.node.state == "drained")
        tg.cancel_scope.cancel()
    assert scheduled.act_at is not None and utcnow() >= scheduled.act_at


async def test_earlier_second_notice_tightens_without_restarting(tmp_path: Path) -> None:
    source, block = ScriptedSource(), anyio.Event()
    driver = RecordingDriver(block)
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(event_id="late", seconds=300)]
        await until(lambda: agent.node.state == "draining")
        source.live = [notice(event_id="late", seconds=300), notice(kind="scheduled-event", event_id="soon", seconds=60)]
        await until(lambda: driver.tightened)
        block.set()
        await until(lambda: agent.node.state == "drained")
        tg.cancel_scope.cancel()
    assert len(driver.runs) == 1
    deadline = agent.deadline.current
    assert deadline is not None and deadline.vm_seconds_left() < 61 and deadline.kind == "scheduled-event"
    assert driver.tightened[-1] == deadline and deadline.drain == deadline.vm - timedelta(seconds=5.0)  # the margin
    assert agent.node.notice is not None and agent.node.notice.event_id == "late"  # still the drain's notice
    saved, _ = StateStore(tmp_path).load()
    assert saved.deadline is not None and saved.deadline.to_json() == deadline.to_json()  # ms on disk


async def test_errors_are_counted_and_polling_continues(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.fail = MalformedMetadata("bad JSON", reason="bad_json")
        await until(lambda: agent.operator.health()["aws"]["errors"] == 1)
        source.fail = ZeroDivisionError("a bug in a source")
        await until(lambda: agent.operator.health()["aws"]["errors"] == 2)
        source.live = [notice()]
        await until(lambda: agent.node.state == "drained")
        tg.cancel_scope.cancel()
    assert agent.metrics.poll_errors.labels(source="aws", reason="bad_json")._value.get() == 1
    assert agent.metrics.poll_errors.labels(source="aws", reason="internal")._value.get() == 1


async def test_restart_while_draining_resumes_and_unreadable_state_serves(tmp_path: Path) -> None:
    source, block = ScriptedSource(), anyio.Event()
    agent = make_agent(tmp_path, source, RecordingDriver(block))
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.node.state == "draining")
        tg.cancel_scope.cancel()  # the daemon dies mid-drain
    driver = RecordingDriver()
    restarted = make_agent(tmp_path, ScriptedSource(), driver)
    assert restarted.node.state == "draining"
    async with anyio.create_task_group() as tg:
        await tg.start(restarted.run)
        await until(lambda: restarted.node.state == "drained")
        tg.cancel_scope.cancel()
    assert driver.runs[0][0].event_id == "e1"
    (tmp_path / "state.json").write_text("{not json")
    assert make_agent(tmp_path, ScriptedSource(), RecordingDriver()).node.state == "serving"


async def test_manual_drain_and_undrain_rules(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        dry = await agent.operator.manual_drain("try", 30, dry_run=True)
        assert dry["dry_run"] and agent.node.state == "serving" and driver.runs[-1][1] is True
        result = await agent.operator.manual_drain("maintenance", 30, dry_run=False)
        assert result["accepted"]
        await until(lambda: agent.node.state == "drained")
        assert (await agent.operator.undrain(force=False))["accepted"]
        assert agent.node.state == "serving"
        source.live = [notice()]
        await until(lambda: agent.node.state == "drained")
        refused = await agent.operator.undrain(force=False)
        assert not refused["accepted"] and "cloud notice" in refused["message"]
        assert (await agent.operator.undrain(force=True))["accepted"]
        polls = source.polls
        await until(lambda: source.polls > polls + 5)  # the forced-away notice does not drain again
        assert agent.node.state == "serving"
        tg.cancel_scope.cancel()


async def test_forced_undrain_stops_a_running_drain_so_its_end_does_not_undo_it(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    driver.block = anyio.Event()  # the drain is still in a step (e.g. acknowledging) when the operator steps in
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.node.state == "draining")
        waiting_on_drain = anyio.Event()

        drain_done = agent.node.wait_drained()  # what the SIGTERM handler holds while the drain runs

        async def sigterm_waiter() -> None:
            await drain_done
            waiting_on_drain.set()

        tg.start_soon(sigterm_waiter)
        assert not (await agent.operator.undrain(force=False))["accepted"]
        assert (await agent.operator.undrain(force=True))["accepted"]
        driver.block.set()  # had the drain not been stopped, it would now finish and mark the node drained
        with anyio.fail_after(5):
            await waiting_on_drain.wait()
        polls = source.polls
        await until(lambda: source.polls > polls + 5)
        assert agent.node.state == "serving"
        assert agent.metrics.drains.labels(source="aws", result="cancelled")._value.get() == 1
        tg.cancel_scope.cancel()


async def test_forced_undrain_after_the_last_step_still_wins(tmp_path: Path) -> None:
    # The undrain lands after the drain's last await: no checkpoint is left in the steps to deliver the cancel.
    source = ScriptedSource()
    agent: Agent | None = None

    class UndrainAtTheEnd(RecordingDriver):
        async def run(self, notice: Notice, deadline: Deadline, resumed: Timeline | None, *, dry_run: bool,
                      on_change: Callable[[Timeline], None]) -> Timeline:
            steps = await super().run(notice, deadline, resumed, dry_run=dry_run, on_change=on_change)
            assert agent is not None
            await agent.operator.undrain(force=True)  # no await inside: runs to completion without yielding
            return steps

    agent = make_agent(tmp_path, source, UndrainAtTheEnd())
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.metrics.drains.labels(source="aws", result="cancelled")._value.get() == 1)
        assert agent.node.state == "serving"
        tg.cancel_scope.cancel()


async def test_a_forced_undrain_is_remembered_across_a_restart(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice()]
        await until(lambda: agent.node.state == "drained")
        assert (await agent.operator.undrain(force=True))["accepted"]
        assert agent.node.state == "serving" and driver.restores  # the undo plan ran
        tg.cancel_scope.cancel()
    # The daemon restarts (an upgrade) while the cloud still reports the notice the operator overrode.
    source, driver = ScriptedSource(), RecordingDriver()
    source.live = [notice()]
    restarted = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(restarted.run)
        await until(lambda: source.polls > 5)
        assert restarted.node.state == "serving" and not driver.runs
        source.live = []  # withdrawn: the override is dropped with it
        await until(lambda: not restarted.notices.suppressed)
        tg.cancel_scope.cancel()
    saved, _ = StateStore(tmp_path).load()
    assert saved.suppressed == ()


async def drain_then_bring_forward(agent: Agent, source: ScriptedSource, seconds: float) -> None:
    """Drain for a notice 300 s away; once drained, a second notice ``seconds`` away; stop once it is adopted."""
    late = notice(event_id="late", seconds=300)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [late]
        await until(lambda: agent.node.state == "drained")
        source.live = [late, notice(kind="scheduled-event", event_id="soon", seconds=seconds)]
        await until(lambda: agent.deadline.current is not None and agent.deadline.current.kind == "scheduled-event")
        tg.cancel_scope.cancel()


async def test_an_earlier_notice_once_drained_reaches_every_listener(tmp_path: Path) -> None:
    # The gate relays answers from peers after the drain is over: its deadline must still move (issue 16).
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    heard: list[Deadline | None] = []
    agent.deadline.listen(heard.append)  # as the gate link does
    await drain_then_bring_forward(agent, source, 30)
    assert heard[0] is None and [d.kind for d in heard[1:] if d] == ["spot-interruption", "scheduled-event"]
    status = agent.operator.status()
    assert status["deadline"]["kind"] == "scheduled-event" and 0 < status["seconds_left"] < 31
    assert agent.node.state == "drained" and len(driver.runs) == 1  # no second drain
    soon = heard[-1]
    assert soon is not None and agent.metrics.deadline._value.get() == soon.vm.timestamp()


async def test_a_restarted_daemon_hands_on_the_persisted_deadline_first(tmp_path: Path) -> None:
    source = ScriptedSource()
    agent = make_agent(tmp_path, source, RecordingDriver())
    await drain_then_bring_forward(agent, source, 60)  # then the daemon dies
    tightened = agent.deadline.current
    assert tightened is not None
    restarted = make_agent(tmp_path, ScriptedSource(), RecordingDriver())
    heard: list[Deadline | None] = []
    restarted.deadline.listen(heard.append)  # before anything runs: what the gate link gets before it attaches
    assert [d.to_json() if d else None for d in heard] == [tightened.to_json()]
    assert restarted.node.refuses_new_work()


async def test_a_state_file_of_the_previous_version_resumes_its_drain(tmp_path: Path) -> None:
    # An upgrade mid-drain: the old daemon wrote the timeline as a one-document list and no deadline (its
    # notice carried the tightened one).
    import json

    from spotguard.agent.state import current_boot_id

    old = notice(seconds=90)
    timeline = finished(old.key, old.deadline, "readiness")
    (tmp_path / "state.json").write_text(json.dumps({
        "state": "draining", "notice": old.to_json(), "timeline": [timeline.to_json()], "restore": [],
        "suppressed": [], "boot_id": current_boot_id()}))
    driver = RecordingDriver()
    agent = make_agent(tmp_path, ScriptedSource(), driver)
    deadline = agent.deadline.current
    assert deadline is not None and deadline.vm_seconds_left() < 91
    assert deadline.drain == deadline.vm - timedelta(seconds=5.0)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        await until(lambda: agent.node.state == "drained")
        tg.cancel_scope.cancel()
    resumed = driver.resumed[0]
    assert resumed is not None and resumed.step("readiness").outcome == "ok"
    # A timeline that cannot be read back is left out, and said: the node stays out of rotation.
    (tmp_path / "state.json").write_text(json.dumps({"state": "draining", "notice": old.to_json(),
                                                    "timeline": {"version": 99}, "boot_id": current_boot_id()}))
    unreadable = make_agent(tmp_path, ScriptedSource(), RecordingDriver())
    assert unreadable.node.state == "draining" and unreadable.node.timeline is None
    assert unreadable.metrics.config_errors.labels(component="state", reason="unreadable")._value.get() == 1


async def test_a_manual_drain_of_a_drained_node_only_brings_its_deadline_forward(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    agent = make_agent(tmp_path, source, driver)
    heard: list[Deadline | None] = []
    agent.deadline.listen(heard.append)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        source.live = [notice(seconds=300)]
        await until(lambda: agent.node.state == "drained")
        later = await agent.operator.manual_drain("later", 600, dry_run=False)
        assert not later["accepted"] and later["message"] == "already drained"
        sooner = await agent.operator.manual_drain("sooner", 20, dry_run=False)
        assert sooner["accepted"] and sooner["started"] is False and "earlier than before" in sooner["message"]
        assert agent.deadline.current is not None and agent.deadline.current.source == "manual"
        assert heard[-1] == agent.deadline.current and len(driver.runs) == 1
        assert (await agent.operator.undrain(force=True))["accepted"]
        assert agent.node.state == "serving" and heard[-1] is None  # an undrain ends the deadline
        assert agent.operator.status()["deadline"] is None and agent.metrics.deadline._value.get() == 0
        tg.cancel_scope.cancel()


class SlowRestore(RecordingDriver):
    async def restore(self, drained: Timeline | None, resumed: Timeline | None, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        await anyio.sleep_forever()  # an engine unit that takes minutes to start
        raise AssertionError("unreachable")


@pytest.mark.parametrize("by", ["cloud notice", "manual drain"])
async def test_a_notice_coming_due_during_a_restore_stops_it_and_drains(tmp_path: Path, by: str) -> None:
    source, driver = ScriptedSource(), SlowRestore()
    agent = make_agent(tmp_path, source, driver)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        await agent.operator.manual_drain("maintenance", 30, dry_run=False)
        await until(lambda: agent.node.state == "drained")
        tg.start_soon(agent.operator.undrain, False)
        await until(lambda: agent.node.state == "restoring")
        if by == "cloud notice":
            source.live = [notice()]
        else:  # the operator changed their mind
            again = await agent.operator.manual_drain("changed my mind", 30, dry_run=False)
            assert again["accepted"] and again["state"] in ("draining", "drained")
        await until(lambda: agent.node.state == "drained" and len(driver.runs) == 2)
        tg.cancel_scope.cancel()


class HungDisk(StateStore):
    """A state disk that hangs on the first write of the drain's start for ``notice_key`` until the test lets it go."""

    def __init__(self, state_dir: Path, notice_key: str) -> None:
        super().__init__(state_dir)
        self.notice_key = notice_key
        self.writing = anyio.Event()
        """Set once that write has begun (and hangs)."""
        self.release = threading.Event()

    def save(self, persisted: Persisted) -> None:
        if (persisted.state == "draining" and persisted.notice is not None
                and persisted.notice.key == self.notice_key and not self.writing.is_set()):
            anyio.from_thread.run_sync(self.writing.set)
            self.release.wait(60)  # bounded: a test that fails still ends
        super().save(persisted)


async def test_a_hung_state_disk_does_not_hold_the_drain(tmp_path: Path) -> None:
    source, driver = ScriptedSource(), RecordingDriver()
    disk = HungDisk(tmp_path, notice().key)
    agent = make_agent(tmp_path, source, driver, store=disk)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        try:
            source.live = [notice()]
            with anyio.fail_after(5):
                await disk.writing.wait()
                while agent.node.state != "drained":  # after DURABLE_START_WAIT the drain goes on without the disk
                    await agent.node.state_changed()
            assert len(driver.runs) == 1
        finally:
            disk.release.set()
        tg.cancel_scope.cancel()
    saved, _ = StateStore(tmp_path).load()
    assert saved.state == "drained"  # the writes that waited for the disk landed after it, in order


class RestoreStoppedOnce(RecordingDriver):
    """The first restore takes minutes (an engine unit starting); the next one finishes at once."""

    async def restore(self, drained: Timeline | None, resumed: Timeline | None, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        if not self.restores:
            self.restores.append(drained)
            await anyio.sleep_forever()
        return await super().restore(drained, resumed, on_change=on_change)


@pytest.mark.parametrize("found", ["serving", "restoring"])
async def test_an_undrain_while_a_drain_writes_its_start_leaves_the_node_as_it_found_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, found: str) -> None:
    # The drain still waits for its start to be on disk (the node says serving, or restoring) when the operator
    # undrains: the operator is told "already serving", so the node must not go on to say draining.
    monkeypatch.setattr(node_module, "DURABLE_START_WAIT", 60.0)
    source, driver = ScriptedSource(), RestoreStoppedOnce()
    disk = HungDisk(tmp_path, notice().key)
    agent = make_agent(tmp_path, source, driver, store=disk)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        try:
            with anyio.fail_after(10):
                if found == "restoring":
                    await agent.operator.manual_drain("maintenance", 30, dry_run=False)
                    while agent.node.state != "drained":
                        await agent.node.state_changed()
                    tg.start_soon(agent.operator.undrain, False)
                    while agent.node.state != "restoring":
                        await agent.node.state_changed()
                source.live = [notice()]  # comes due: the drain starts, and its start hangs on the disk
                await disk.writing.wait()
            assert agent.node.state == found and agent.deadline.current is not None
            cleared = anyio.Event()
            agent.deadline.listen(lambda deadline: cleared.set() if deadline is None else None)
            answer = await agent.operator.undrain(force=True)
            assert answer["accepted"] and answer["message"] == f"already {found}"
            with anyio.fail_after(10):
                await cleared.wait()  # the deadline the stopped drain adopted is gone
                while agent.node.state != "serving":  # a restore the drain had stopped goes on
                    await agent.node.state_changed()
            assert agent.operator.status()["deadline"] is None
            assert agent.metrics.drains.labels(source="aws", result="cancelled")._value.get() == 1
            assert len(driver.runs) == (1 if found == "restoring" else 0)  # the stopped drain never ran its plan
        finally:
            disk.release.set()
        tg.cancel_scope.cancel()
    saved, _ = StateStore(tmp_path).load()
    assert saved.state == "serving" and saved.deadline is None  # written after the drain's start, in its place
