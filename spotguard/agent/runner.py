"""The runner: polls every source, de-duplicates notices, decides when to drain, persists state.

Sources report; the runner owns polling, backoff, error counting and the node's state machine:

    serving --(due drain notice)--> draining --(plan finished)--> drained
    drained --(undrain)--> restoring --(undo plan finished)--> serving

``restoring`` puts back what the drain changed (engine, gate, load balancers); a notice that comes due
meanwhile stops the restore and drains. A daemon restarted in ``draining`` or ``restoring`` picks the
plan up where it was, without re-running finished steps.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import anyio
import tenacity
from anyio.abc import TaskGroup, TaskStatus

from spotguard.agent.state import NodeState, Persisted, StateStore, StateWriter, current_boot_id
from spotguard.clouds.operator import manual_notice, shutdown_notice
from spotguard.config import Config
from spotguard.errors import MetadataError, SpotguardError
from spotguard.metrics import Metrics
from spotguard.notice import Notice, NoticeSource, rfc3339, utcnow

OPERATOR_SOURCES = ("manual", "shutdown")
DURABLE_START_WAIT = 0.5
"""Most seconds a drain waits for its start to be on disk before it takes the node out of rotation."""
UNDRAIN_ANSWER_WAIT = 8.0
"""Seconds ``undrain`` waits for the restore before answering (the control socket allows 10)."""
Timeline = list[dict[str, Any]]


class DrainDriver(Protocol):
    """Runs the drain plan for a notice; the runner only sequences and persists it."""

    async def run(self, notice: Notice, timeline: Timeline, *, dry_run: bool,
                  on_change: Callable[[Timeline], None]) -> Timeline: ...

    def tighten(self, deadline: datetime) -> None: ...

    async def restore(self, drained: Timeline, timeline: Timeline, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        """Undo what the drain recorded in ``drained`` (engine, gate, load balancers); resumes ``timeline``."""
        ...


@dataclass
class SourceHealth:
    last_ok: float | None = None
    """Unix time of the last good poll."""
    last_empty: float | None = None
    last_error: str = ""
    errors: int = 0
    polls: int = 0


class Agent:
    """One per daemon. Thread-free: everything runs in the daemon's task group."""

    def __init__(self, *, config: Config, cloud: str, metrics: Metrics, log: Any, store: StateStore,
                 sources: Sequence[NoticeSource], driver: DrainDriver) -> None:
        self.config = config
        self.cloud = cloud
        self.metrics = metrics
        self.log = log
        self.store = store
        self.sources = list(sources)
        self.driver = driver
        self.started_at = utcnow()
        self._live: dict[str, dict[str, Notice]] = {}
        self._first_seen: dict[str, datetime] = {}
        self._observed: dict[str, Notice] = {}
        self._writer = StateWriter(store, self._write_failed)
        self._health = {source.name: SourceHealth() for source in self.sources}
        self._changed = anyio.Event()
        self._drain_done = anyio.Event()
        self._drain_scope: anyio.CancelScope | None = None
        """The running drain, so that a forced undrain can stop it rather than be overwritten by its end."""
        self._restore_scope: anyio.CancelScope | None = None
        """The running restore, so that a notice coming due can stop it and drain."""
        self._tg: TaskGroup | None = None
        self._drain_starting = False
        """A drain task was started and has not yet made its start durable (see ``_run_drain``)."""
        self._restored = anyio.Event()
        self.status_extras: list[Callable[[], dict[str, Any]]] = []
        """Sections other parts of the daemon add to the status document (readiness, cloud)."""
        persisted, problem = store.load()
        if problem:
            log.error("state_unreadable", problem=problem, action="starting as serving")
            metrics.config_errors.labels(component="state", reason="unreadable").inc()
        boot = current_boot_id()
        if persisted.boot_id and boot and persisted.boot_id != boot:
            if persisted.state != "serving":
                log.warning("state_from_previous_boot", state=persisted.state, action="starting as serving")
            # Notices (and an operator's decision to ignore them) do not outlive the VM's boot.
            persisted = Persisted(boot_id=boot)
        self._persisted = persisted.with_(boot_id=boot or persisted.boot_id)
        self._suppressed: set[str] = set(self._persisted.suppressed)
        """Keys of cloud notices an operator forced away (undrain --force); ignored until withdrawn."""
        metrics.set_state(self._persisted.state)

    # ---- what the outside reads ------------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        return self._persisted.state

    @property
    def notice(self) -> Notice | None:
        return self._persisted.notice

    @property
    def ready(self) -> bool:
        return self._persisted.state == "serving"

    @property
    def suppressed(self) -> frozenset[str]:
        return frozenset(self._suppressed)

    def live_notices(self) -> list[Notice]:
        return [n for by_key in self._live.values() for n in by_key.values()]

    def health(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {
            name: {
                "last_ok_age_seconds": round(now - h.last_ok, 3) if h.last_ok else None,
                "polls": h.polls,
                "errors": h.errors,
                "last_error": h.last_error,
            }
            for name, h in self._health.items()
        }

    def status(self) -> dict[str, Any]:
        notice = self._persisted.notice
        doc: dict[str, Any] = {
            "state": self._persisted.state,
            "cloud": self.cloud,
            "notice": _public_notice(notice),
            "seconds_left": round(notice.seconds_left(), 3) if notice else None,
            # What the drain works to: the notice's deadline less [drain] safety_margin (status, --svg).
            "drain_deadline": rfc3339(notice.deadline - timedelta(seconds=self.config.drain.safety_margin))
            if notice else None,
            "steps": _steps(self._persisted.timeline),
            "restore_steps": _steps(self._persisted.restore),
            "live_notices": [_public_notice(n) for n in self.live_notices()],
            "observed": [_public_notice(n) for n in self._observed.values()],
            "sources": self.health(),
            "dry_run": self.config.agent.dry_run,
            "started_at": rfc3339(self.started_at),
        }
        for extra in self.status_extras:
            doc.update(extra())
        return doc

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
                if self._persisted.state == "draining" and self._persisted.notice:
                    self.log.warning("resuming_drain", notice=_public_notice(self._persisted.notice),
                                     steps_done=sum(1 for s in _steps(self._persisted.timeline)
                                                    if s.get("state") == "done"))
                    tg.start_soon(self._drain, self._persisted.notice, name="drain")
                elif self._persisted.state == "restoring":
                    self.log.warning("resuming_restore")
                    tg.start_soon(self._restore, name="restore")
                elif self._persisted.state == "drained":
                    self._drain_done.set()
                for source in self.sources:
                    tg.start_soon(self._poll_forever, source, name=f"poll:{source.name}")
                tg.start_soon(self._decide_forever, name="decide")
                task_status.started()
        finally:
            await self._writer.flush()

    def add_sources(self, sources: Sequence[NoticeSource]) -> None:
        """Start polling sources found after start-up (a cloud confirmed late by a re-probe)."""
        assert self._tg is not None, "add_sources before run()"
        for source in sources:
            self.sources.append(source)
            self._health[source.name] = SourceHealth()
            self._tg.start_soon(self._poll_forever, source, name=f"poll:{source.name}")

    async def _poll_forever(self, source: NoticeSource) -> None:
        interval = self.config.agent.poll_interval
        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_random_exponential(multiplier=min(0.2, interval), max=self.config.agent.max_backoff),
            retry=tenacity.retry_if_exception_type((MetadataError, SpotguardError)),
            stop=tenacity.stop_never,
            sleep=anyio.sleep,
            reraise=True,
        )
        while True:
            async for attempt in retrying:
                with attempt:
                    notices = await self._poll_once(source)
            self._reconcile(source.name, notices)
            if not source.hanging:
                await anyio.sleep(source.interval or interval)

    async def _poll_once(self, source: NoticeSource) -> Sequence[Notice]:
        health = self._health[source.name]
        started = time.monotonic()
        try:
            notices = await source.poll()
        except MetadataError as exc:
            self._count_error(source.name, exc.reason, str(exc))
            raise
        except SpotguardError as exc:
            self._count_error(source.name, type(exc).__name__, str(exc))
            raise
        except Exception as exc:  # a bug or an unexpected library error: never let it end the poll loop
            self._count_error(source.name, "internal", f"{type(exc).__name__}: {exc}")
            self.log.exception("poll_internal_error", source=source.name)
            raise SpotguardError(f"{source.name}: {type(exc).__name__}") from exc
        if not source.hanging:
            self.metrics.poll_latency.labels(source=source.name).observe(time.monotonic() - started)
        now = time.time()
        health.polls += 1
        health.last_ok = now
        self.metrics.polls.labels(source=source.name, result="ok").inc()
        self.metrics.last_poll_ok.labels(source=source.name).set(now)
        if not any(n.action == "drain" for n in notices):
            health.last_empty = now
        return notices

    def _count_error(self, source: str, reason: str, message: str) -> None:
        health = self._health[source]
        health.errors += 1
        health.last_error = message
        self.metrics.polls.labels(source=source, result="error").inc()
        self.metrics.poll_errors.labels(source=source, reason=reason).inc()
        self.log.warning("poll_failed", source=source, reason=reason, error=message)

    # ---- notices -----------------------------------------------------------------------------------

    def _reconcile(self, source: str, notices: Sequence[Notice]) -> None:
        """Record what a source reports now: new notices are counted once, missing ones are withdrawn."""
        previous = self._live.get(source, {})
        current: dict[str, Notice] = {}
        for notice in notices:
            first = self._first_seen.setdefault(notice.key, notice.detected_at)
            if first != notice.detected_at:
                notice = Notice(source=notice.source, kind=notice.kind, event_id=notice.event_id,
                                deadline=notice.deadline, detected_at=first, action=notice.action,
                                act_at=notice.act_at, payload=notice.payload)
            current[notice.key] = notice
            if notice.key not in previous:
                self._on_new(notice)
        for key, gone in previous.items():
            if key not in current:
                self._on_withdrawn(gone)
        self._live[source] = current
        self._changed.set()

    def _on_new(self, notice: Notice) -> None:
        self.metrics.notices.labels(source=notice.source, kind=notice.kind, action=notice.action).inc()
        health = self._health.get(notice.source)
        if health and health.last_empty:
            # An upper bound: the notice appeared after the last poll that did not show it.
            bound = max(0.0, notice.detected_at.timestamp() - health.last_empty)
            self.metrics.detection_latency.labels(source=notice.source).observe(bound)
        if notice.action == "observe":
            self._observed[notice.key] = notice
        self.log.warning("notice", **_public_notice(notice) or {})

    def _on_withdrawn(self, notice: Notice) -> None:
        self._first_seen.pop(notice.key, None)
        self._observed.pop(notice.key, None)
        if notice.key in self._suppressed:
            self._suppressed.discard(notice.key)
            self._set(self._persisted.with_(suppressed=tuple(sorted(self._suppressed))))
        self.metrics.withdrawals.labels(source=notice.source, kind=notice.kind).inc()
        started = self._persisted.notice is not None and self._persisted.notice.key == notice.key
        self.log.warning("notice_withdrawn", source=notice.source, kind=notice.kind, event_id=notice.event_id,
                         drain_already_started=started)

    def inject(self, notice: Notice) -> None:
        """Add an operator notice (manual drain, OS shutdown) as if a source had reported it."""
        current = dict(self._live.get(notice.source, {}))
        current[notice.key] = notice
        self._first_seen.setdefault(notice.key, notice.detected_at)
        self._on_new(notice)
        self._live[notice.source] = current
        self._changed.set()

    def _due(self, now: datetime) -> list[Notice]:
        return sorted((n for n in self.live_notices()
                       if n.action == "drain" and n.due(now) and n.key not in self._suppressed),
                      key=lambda n: n.deadline)

    async def _decide_forever(self) -> None:
        while True:
            self._changed = anyio.Event()
            now = utcnow()
            due = self._due(now)
            if due and self._persisted.state in ("serving", "restoring") and not self._drain_starting:
                assert self._tg is not None
                self._drain_starting = True
                if self._restore_scope is not None:
                    self.log.warning("restore_stopped", reason="a notice came due", **_public_notice(due[0]) or {})
                    self._restore_scope.cancel()
                    self._restore_scope = None
                self._tg.start_soon(self._drain, due[0], name="drain")
            elif due and self._persisted.state == "draining" and self._persisted.notice:
                if due[0].deadline < self._persisted.notice.deadline:
                    self._tighten(due[0])
            waits = [(n.act_at - now).total_seconds() for n in self.live_notices()
                     if n.action == "drain" and n.act_at and not n.due(now) and n.key not in self._suppressed]
            with anyio.move_on_after(max(0.0, min(waits)) if waits else float("inf")):
                await self._changed.wait()

    def _tighten(self, notice: Notice) -> None:
        current = self._persisted.notice
        assert current is not None
        self.log.warning("deadline_tightened", old=rfc3339(current.deadline), new=rfc3339(notice.deadline),
                         by_source=notice.source, by_kind=notice.kind)
        self._set(self._persisted.with_(notice=current.with_deadline(notice.deadline)))
        self.metrics.deadline.set(notice.deadline.timestamp())
        self.driver.tighten(notice.deadline)

    # ---- draining ----------------------------------------------------------------------------------

    def _set(self, persisted: Persisted, *, submit: bool = True) -> None:
        self._persisted = persisted
        self.metrics.set_state(persisted.state)
        if submit:
            self._writer.submit(persisted)

    def _write_failed(self, exc: OSError) -> None:
        # The drain goes on without persistence rather than stopping: losing the file costs a resume.
        self.metrics.config_errors.labels(component="state", reason="write_failed").inc()
        self.log.error("state_write_failed", path=str(self.store.path), error=str(exc))

    def _on_timeline(self, timeline: Timeline) -> None:
        self._set(self._persisted.with_(timeline=list(timeline)))

    async def _drain(self, notice: Notice) -> None:
        with anyio.CancelScope() as scope:
            self._drain_scope = scope
            try:
                await self._run_drain(notice)
            finally:
                self._drain_starting = False  # also when cancelled while its start was being written
        if self._drain_scope is scope:  # a forced undrain may already have let the next drain start
            self._drain_scope = None
        if scope.cancelled_caught:
            self.metrics.drains.labels(source=notice.source, result="cancelled").inc()
            self.log.warning("drain_cancelled", reason="undrain --force", **_public_notice(notice) or {})

    async def _run_drain(self, notice: Notice) -> None:
        resuming = self._persisted.state == "draining"
        timeline = self._persisted.timeline if resuming else []
        started = self._persisted.with_(state="draining", notice=notice, timeline=timeline, restore=[])
        if not resuming:
            # Durable before visible: once /readyz says 503, a kill -9 must not bring the node back into
            # rotation. The write runs in a worker thread; a disk slower than this bound does not hold the drain.
            self._writer.submit(started)
            with anyio.move_on_after(DURABLE_START_WAIT):
                await self._writer.flush()
        self._drain_starting = False
        self._set(started, submit=resuming)
        self.metrics.deadline.set(notice.deadline.timestamp())
        self.log.warning("drain_started", resuming=resuming, seconds_left=round(notice.seconds_left(), 3),
                         **_public_notice(notice) or {})
        result = "ok"
        try:
            timeline = await self.driver.run(notice, timeline, dry_run=self.config.agent.dry_run,
                                             on_change=self._on_timeline)
        except Exception as exc:  # the node stays out of rotation even if the plan itself broke
            result = "error"
            self.log.exception("drain_failed", error=f"{type(exc).__name__}: {exc}")
            timeline = self._persisted.timeline
        # A forced undrain cancels this drain; when it came after the last step's last await, this checkpoint is
        # where the cancellation lands, before the drain marks the node drained over the operator's decision.
        await anyio.lowlevel.checkpoint()
        current = self._persisted.notice or notice
        slack = current.seconds_left()
        self.metrics.drain_slack.set(slack)
        if result != "ok":  # the drain engine counts the drains it finished itself
            self.metrics.drains.labels(source=current.source, result=result).inc()
        self._set(self._persisted.with_(state="drained", timeline=timeline))
        self.log.warning("drain_finished", result=result, slack_seconds=round(slack, 3))
        self._drain_done.set()

    # ---- operator controls (called through the control socket) -------------------------------------

    async def manual_drain(self, reason: str, deadline_seconds: float | None, dry_run: bool) -> dict[str, Any]:
        seconds = deadline_seconds if deadline_seconds is not None else self.config.drain.manual_deadline
        notice = manual_notice(reason, seconds)
        if dry_run:
            timeline = await self.driver.run(notice, [], dry_run=True, on_change=lambda _t: None)
            return {"dry_run": True, "notice": _public_notice(notice), "steps": _steps(timeline)}
        if self._persisted.state != "serving":
            if self._persisted.notice and notice.deadline < self._persisted.notice.deadline:
                self._tighten(notice)
            return {"accepted": False, "state": self._persisted.state,
                    "message": f"already {self._persisted.state}", "notice": _public_notice(self._persisted.notice)}
        self.inject(notice)
        with anyio.fail_after(5):
            while self._persisted.state == "serving":
                await anyio.sleep(0.005)
        return {"accepted": True, "state": self._persisted.state, "notice": _public_notice(notice)}

    async def undrain(self, force: bool) -> dict[str, Any]:
        cloud_live = [n for n in self.live_notices() if n.action == "drain"
                      and n.source not in OPERATOR_SOURCES and n.key not in self._suppressed]
        state = self._persisted.state
        if cloud_live and not force:
            return {"accepted": False, "state": state,
                    "message": "a cloud notice is live: this VM is going away (use --force to serve anyway)",
                    "live_notices": [_public_notice(n) for n in cloud_live]}
        if state == "draining" and not force:
            return {"accepted": False, "state": state,
                    "message": "a drain is running; wait for it to finish or use --force"}
        for source in OPERATOR_SOURCES:
            for notice in self._live.pop(source, {}).values():
                self._first_seen.pop(notice.key, None)
        if force:
            self._suppressed.update(n.key for n in cloud_live)
        if self._drain_scope is not None:  # only reachable with force: stop the drain before it marks us drained
            self._drain_scope.cancel()
            self._drain_done.set()  # whoever waits on that drain (a SIGTERM exit) sees it end
        self._drain_done = anyio.Event()
        self.log.warning("undrained", forced=force, suppressed=len(self._suppressed))
        if state in ("serving", "restoring"):
            self._set(self._persisted.with_(suppressed=tuple(sorted(self._suppressed))))
            self._changed.set()
            return {"accepted": True, "state": state, "message": f"already {state}",
                    "steps": _steps(self._persisted.restore)}
        self._set(self._persisted.with_(state="restoring", notice=None, restore=[],
                                        suppressed=tuple(sorted(self._suppressed))))
        restored = self._restored = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._restore, name="restore")
        # The operator sees what was put back; a slow engine start goes on and `status` shows it.
        with anyio.move_on_after(UNDRAIN_ANSWER_WAIT):
            await restored.wait()
        done = self._persisted.state == "serving"
        return {"accepted": True, "state": self._persisted.state,
                "message": "undrained: serving again" if done else
                           "undrained: still putting things back (see spotguard status)",
                "steps": _steps(self._persisted.restore)}

    async def _restore(self) -> None:
        with anyio.CancelScope() as scope:
            self._restore_scope = scope
            try:
                restore = await self.driver.restore(self._persisted.timeline, self._persisted.restore,
                                                    on_change=self._on_restore)
            except Exception as exc:  # the node must not stay out of rotation because undo itself broke
                self.log.exception("restore_failed", error=f"{type(exc).__name__}: {exc}")
                restore = self._persisted.restore
            await anyio.lowlevel.checkpoint()  # a notice coming due at the very end still wins
        if self._restore_scope is scope:
            self._restore_scope = None
        if scope.cancelled_caught:
            return
        self._set(self._persisted.with_(state="serving", restore=list(restore)))
        self.log.warning("restored", steps={s.get("name"): s.get("outcome") for s in _steps(restore)})
        self._restored.set()
        self._changed.set()

    def _on_restore(self, timeline: Timeline) -> None:
        if self._persisted.state == "restoring":
            self._set(self._persisted.with_(restore=list(timeline)))

    def shorten_drain(self, seconds: float, why: str) -> None:
        """Bring the running drain's deadline to ``seconds`` from now (SIGTERM during a drain)."""
        current = self._persisted.notice
        if self._persisted.state != "draining" or current is None:
            return
        shortened = shutdown_notice(seconds)
        if shortened.deadline < current.deadline:
            self.log.warning("drain_shortened", why=why, seconds=seconds)
            self._tighten(shortened)


def _steps(timeline: Timeline) -> list[dict[str, Any]]:
    """The step records of a persisted timeline (the drain engine persists one document with ``steps``)."""
    if len(timeline) == 1 and isinstance(timeline[0].get("steps"), list):
        return list(timeline[0]["steps"])
    return timeline


def _public_notice(notice: Notice | None) -> dict[str, Any] | None:
    """The notice as /status shows it. The raw payload is metadata, not user data, but can be long."""
    if notice is None:
        return None
    doc: dict[str, Any] = dict(notice.to_json())
    doc.pop("payload", None)
    return doc

