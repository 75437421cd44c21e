"""The node's state machine: when to drain, the drain and the restore, and the state on disk.

    serving --(due drain notice)--> draining --(plan finished)--> drained
    drained --(undrain)--> restoring --(undo plan finished)--> serving

``restoring`` puts back what the drain changed (engine, gate, load balancers); a notice that comes due
meanwhile stops the restore and drains. A daemon restarted in ``draining`` or ``restoring`` picks the
plan up where it was, without re-running finished steps. Every transition is persisted (``state.py``);
a drain's start is on disk before the node leaves rotation, so a kill -9 cannot bring it back.

While draining or drained, a due notice with an earlier deadline tightens the node's deadline
(``agent/deadline.py``), which reaches the running drain and the gate alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus

from spotguard.agent.deadline import DeadlineOwner
from spotguard.agent.notices import NoticeBook, public_notice
from spotguard.agent.state import NodeState, Persisted, StateStore, StateWriter, current_boot_id
from spotguard.clouds.operator import shutdown_notice
from spotguard.config import Config
from spotguard.deadline import Deadline
from spotguard.drain.timeline import Timeline
from spotguard.metrics import Metrics
from spotguard.notice import Notice, utcnow

DURABLE_START_WAIT = 0.5
"""Most seconds a drain waits for its start to be on disk before it takes the node out of rotation."""


class DrainDriver(Protocol):
    """Runs the drain plan for a notice and the undo plan of an undrain; the node only sequences and persists."""

    async def run(self, notice: Notice, deadline: Deadline, resumed: Timeline | None, *, dry_run: bool,
                  on_change: Callable[[Timeline], None]) -> Timeline:
        """Drain for ``notice`` by ``deadline``; ``resumed`` is the timeline a restarted daemon goes on with."""
        ...

    def tighten(self, deadline: Deadline) -> None:
        """An earlier deadline for the drain under way (its running steps adopt it)."""
        ...

    async def restore(self, drained: Timeline | None, resumed: Timeline | None, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        """Undo what the drain recorded in ``drained`` (engine, gate, load balancers); resumes ``resumed``."""
        ...


def load_state(store: StateStore, *, log: Any, metrics: Metrics) -> Persisted:
    """The persisted state, as a restarted daemon starts from it: what is unreadable is said and counted,
    and a state from a previous boot of the VM is dropped (notices do not outlive the boot)."""
    persisted, problem = store.load()
    if problem:
        log.error("state_unreadable", problem=problem, state=persisted.state)
        metrics.config_errors.labels(component="state", reason="unreadable").inc()
    boot = current_boot_id()
    if persisted.boot_id and boot and persisted.boot_id != boot:
        if persisted.state != "serving":
            log.warning("state_from_previous_boot", state=persisted.state, action="starting as serving")
        # Notices (and an operator's decision to ignore them) do not outlive the VM's boot.
        persisted = Persisted(boot_id=boot)
    return persisted.with_(boot_id=boot or persisted.boot_id)


class NodeMachine:
    """One per daemon. Thread-free: everything runs in the agent's task group."""

    def __init__(self, *, config: Config, persisted: Persisted, store: StateStore, driver: DrainDriver,
                 notices: NoticeBook, deadline: DeadlineOwner, metrics: Metrics, log: Any) -> None:
        self._config = config
        self._persisted = persisted
        self._store = store
        self._driver = driver
        self._notices = notices
        self._deadline = deadline
        self._metrics = metrics
        self._log = log
        self._writer = StateWriter(store, self._write_failed)
        self._tg: TaskGroup | None = None
        self._state_changed = anyio.Event()
        self._drain_done = anyio.Event()
        self._restored = anyio.Event()
        self._drain_scope: anyio.CancelScope | None = None
        """The running drain, so that a forced undrain can stop it rather than be overwritten by its end."""
        self._restore_scope: anyio.CancelScope | None = None
        """The running restore, so that a notice coming due can stop it and drain."""
        self._drain_starting = False
        """A drain task was started and has not yet made its start durable (see ``_run_drain``)."""
        metrics.set_state(persisted.state)
        if persisted.state in ("draining", "drained"):
            # Rebuilt before anything listens: the gate link hears it before it attaches. A state file from
            # an older daemon has no deadline: its notice carries the (tightened) one.
            notice = persisted.notice
            deadline.restore(persisted.deadline or (deadline.for_notice(notice) if notice else None))
        deadline.listen(self._deadline_changed)
        notices.on_suppressed(lambda keys: self._set(self._persisted.with_(suppressed=keys)))

    # ---- what the outside reads ------------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        return self._persisted.state

    @property
    def notice(self) -> Notice | None:
        """The notice the drain runs (or ran) for; None while serving or restoring."""
        return self._persisted.notice

    @property
    def timeline(self) -> Timeline | None:
        """The last drain's timeline (kept after an undrain until the next drain starts)."""
        return self._persisted.timeline

    @property
    def restore_timeline(self) -> Timeline | None:
        return self._persisted.restore

    def refuses_new_work(self) -> bool:
        """Whether the gate should refuse new requests in this state: what a restarted daemon declares before
        its gate link attaches. Draining or drained (not a dry run), and restoring until reopen_gate ran."""
        persisted = self._persisted
        if persisted.state in ("draining", "drained"):
            return not (persisted.timeline is not None and persisted.timeline.dry_run)
        if persisted.state == "restoring" and persisted.restore is not None:
            return not any(r.name == "reopen_gate" and r.state == "done" for r in persisted.restore.steps)
        return persisted.state == "restoring"

    def state_changed(self) -> Awaitable[None]:
        """Resolves at the next change of state (bound when called)."""
        return self._state_changed.wait()

    def wait_drained(self) -> Awaitable[None]:
        """Resolves once the drain current at the time of the call (or the next one) has finished.

        Bound at call time, not when first awaited: undrain arms a fresh event for later drains.
        """
        return self._drain_done.wait()

    # ---- running -----------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._writer.run, name="state-writer")
                persisted = self._persisted
                if persisted.state == "draining" and persisted.notice:
                    done = sum(1 for s in persisted.timeline.steps if s.state == "done") if persisted.timeline else 0
                    self._log.warning("resuming_drain", notice=public_notice(persisted.notice), steps_done=done)
                    tg.start_soon(self._drain, persisted.notice, name="drain")
                elif persisted.state == "restoring":
                    self._log.warning("resuming_restore")
                    tg.start_soon(self._restore, name="restore")
                elif persisted.state == "drained":
                    self._drain_done.set()
                tg.start_soon(self._decide_forever, name="decide")
                task_status.started()
        finally:
            await self._writer.flush()

    async def _decide_forever(self) -> None:
        while True:
            changed = self._notices.changed()
            now = utcnow()
            self._decide(now)
            wait = self._notices.seconds_to_next_due(now)
            with anyio.move_on_after(wait if wait is not None else float("inf")):
                await changed

    def _decide(self, now: datetime) -> None:
        due = self._notices.due(now)
        if not due:
            return
        state = self._persisted.state
        if state in ("serving", "restoring") and not self._drain_starting:
            assert self._tg is not None
            self._drain_starting = True
            if self._restore_scope is not None:
                self._log.warning("restore_stopped", reason="a notice came due", **public_notice(due[0]) or {})
                self._restore_scope.cancel()
                self._restore_scope = None
            self._tg.start_soon(self._drain, due[0], name="drain")
        elif state in ("draining", "drained"):
            # The earliest notice wins, also once the drain is over: the gate still relays answers from peers.
            self._deadline.adopt(due[0])

    # ---- the state on disk -------------------------------------------------------------------------

    def _set(self, persisted: Persisted, *, submit: bool = True) -> None:
        previous, self._persisted = self._persisted, persisted
        self._metrics.set_state(persisted.state)
        if submit:
            self._writer.submit(persisted)
        if persisted.state != previous.state:
            self._state_changed.set()
            self._state_changed = anyio.Event()

    def _write_failed(self, exc: OSError) -> None:
        # The drain goes on without persistence rather than stopping: losing the file costs a resume.
        self._metrics.config_errors.labels(component="state", reason="write_failed").inc()
        self._log.error("state_write_failed", path=str(self._store.path), error=str(exc))

    def _deadline_changed(self, deadline: Deadline | None) -> None:
        if deadline != self._persisted.deadline:
            self._set(self._persisted.with_(deadline=deadline))
        if deadline is not None and self._persisted.state == "draining":
            self._driver.tighten(deadline)  # the running drain's steps adopt it at once

    def _on_timeline(self, timeline: Timeline) -> None:
        self._set(self._persisted.with_(timeline=timeline))

    def _on_restore(self, timeline: Timeline) -> None:
        if self._persisted.state == "restoring":
            self._set(self._persisted.with_(restore=timeline))

    # ---- draining ----------------------------------------------------------------------------------

    async def _drain(self, notice: Notice) -> None:
        said_draining = False
        with anyio.CancelScope() as scope:
            self._drain_scope = scope
            try:
                resuming = await self._begin_drain(notice)
                said_draining = True
                await self._run_drain(notice, resuming)
            finally:
                self._drain_starting = False  # also when cancelled while its start was being written
        if self._drain_scope is scope:  # a forced undrain may already have let the next drain start
            self._drain_scope = None
        if scope.cancelled_caught:
            self._metrics.drains.labels(source=notice.source, result="cancelled").inc()
            self._log.warning("drain_cancelled", reason="undrain", before_draining=not said_draining,
                              **public_notice(notice) or {})
            if not said_draining:
                self._abandon_start()

    async def _begin_drain(self, notice: Notice) -> bool:
        """Make the drain's start durable (waiting at most DURABLE_START_WAIT), then say draining; returns
        whether this drain resumes one a previous daemon began."""
        resuming = self._persisted.state == "draining"
        resumed = self._persisted.timeline if resuming else None
        if not resuming:
            self._deadline.adopt(notice)  # none is held while serving or restoring: this one is the deadline
        started = self._persisted.with_(state="draining", notice=notice, timeline=resumed, restore=None)
        if not resuming:
            # Durable before visible: once /readyz says 503, a kill -9 must not bring the node back into
            # rotation. The write is shielded (once begun it finishes), so it runs in a task of its own and only
            # the wait for it is bounded: a disk slower than this bound, or hung, does not hold the drain.
            assert self._tg is not None
            self._writer.submit(started)
            written = anyio.Event()
            self._tg.start_soon(self._writer.flush_then_set, written, name="state-drain-start")
            with anyio.move_on_after(DURABLE_START_WAIT):
                await written.wait()
        # An undrain that came while the start was being written stopped this drain: it lands here, before the
        # node says draining, and _drain puts back the state the undrain saw.
        await anyio.lowlevel.checkpoint()
        self._drain_starting = False
        self._set(started, submit=resuming)
        return resuming

    def _abandon_start(self) -> None:
        """An undrain stopped a drain before it said draining: the node stays as the undrain found it (serving,
        or restoring), without the deadline the drain adopted, and that state replaces the drain's start on disk."""
        self._deadline.clear()
        self._writer.submit(self._persisted)
        if self._persisted.state == "restoring" and self._restore_scope is None:
            # The drain had stopped the restore; the undrain asked for the node back in service.
            assert self._tg is not None
            self._log.warning("restore_resumed", reason="undrain")
            self._tg.start_soon(self._restore, name="restore")

    async def _run_drain(self, notice: Notice, resuming: bool) -> None:
        resumed = self._persisted.timeline if resuming else None
        self._notices.look_again()  # a notice that came due while this drain was starting may be earlier
        deadline = self._deadline.current
        assert deadline is not None, "a draining node always has a deadline"
        self._log.warning("drain_started", resuming=resuming, seconds_left=round(deadline.vm_seconds_left(), 3),
                          **public_notice(notice) or {})
        result = "ok"
        try:
            timeline: Timeline | None = await self._driver.run(
                notice, deadline, resumed, dry_run=self._config.agent.dry_run, on_change=self._on_timeline)
        except Exception as exc:  # the node stays out of rotation even if the plan itself broke
            result = "error"
            self._log.exception("drain_failed", error=f"{type(exc).__name__}: {exc}")
            timeline = self._persisted.timeline
        # A forced undrain cancels this drain; when it came after the last step's last await, this checkpoint is
        # where the cancellation lands, before the drain marks the node drained over the operator's decision.
        await anyio.lowlevel.checkpoint()
        current = self._deadline.current or deadline
        slack = current.vm_seconds_left()
        self._metrics.drain_slack.set(slack)
        if result != "ok":  # the drain engine counts the drains it finished itself
            self._metrics.drains.labels(source=notice.source, result=result).inc()
        self._set(self._persisted.with_(state="drained", timeline=timeline))
        self._log.warning("drain_finished", result=result, drain=timeline.summary() if timeline else None,
                          slack_seconds=round(slack, 3))
        self._drain_done.set()

    def shorten_drain(self, seconds: float, why: str) -> None:
        """Bring the running drain's deadline to ``seconds`` from now (SIGTERM during a drain)."""
        if self._persisted.state == "draining" and self._deadline.adopt(shutdown_notice(seconds)):
            self._log.warning("drain_shortened", why=why, seconds=seconds)

    # ---- undraining --------------------------------------------------------------------------------

    def stop_drain(self) -> None:
        """An undrain: a drain still running (only with --force) is stopped before it marks the node drained;
        whoever waits on the drain (a SIGTERM exit) sees it end, and later drains get a fresh event."""
        if self._drain_scope is not None:
            self._drain_scope.cancel()
            self._drain_done.set()
        self._drain_done = anyio.Event()

    def begin_restore(self) -> Awaitable[None]:
        """Leave drained (or a stopped drain): no deadline any more, and the undo plan puts back what the
        drain changed. Returns what resolves once the node serves again."""
        assert self._tg is not None, "begin_restore before run()"
        self._deadline.clear()
        self._set(self._persisted.with_(state="restoring", notice=None, restore=None))
        restored = self._restored = anyio.Event()
        self._tg.start_soon(self._restore, name="restore")
        return restored.wait()

    async def _restore(self) -> None:
        with anyio.CancelScope() as scope:
            self._restore_scope = scope
            try:
                restore: Timeline | None = await self._driver.restore(
                    self._persisted.timeline, self._persisted.restore, on_change=self._on_restore)
            except Exception as exc:  # the node must not stay out of rotation because undo itself broke
                self._log.exception("restore_failed", error=f"{type(exc).__name__}: {exc}")
                restore = self._persisted.restore
            await anyio.lowlevel.checkpoint()  # a notice coming due at the very end still wins
        if self._restore_scope is scope:
            self._restore_scope = None
        if scope.cancelled_caught:
            return
        self._set(self._persisted.with_(state="serving", restore=restore))
        self._log.warning("restored", steps={r.name: r.outcome for r in restore.steps} if restore else {})
        self._restored.set()
