"""The daemon's side of the gate: finds (or starts) the gate process and keeps it on the declared state.

``GateLink.run`` attaches to the gate answering on ``[gate] control_socket``: one that is already
running for this configuration (a restarted daemon takes over its requests in flight), or, with
``[gate] start = auto``, one it starts itself (``python -m spotguard gate``, in a session of its own so it
outlives the daemon). The daemon never commands the gate step by step: it ``declare``\\ s the state it
wants (draining, the VM's and the drain's deadlines, the peers) whenever that changes, the link pushes
it at once and on every (re)attach, and checks every second that the gate still holds it (a gate
restarted by hand is put back on it). It also keeps ``alive`` current and mirrors the gate's counts into
the daemon's metrics. When the gate dies the daemon logs ``gate_down``, counts it, reports ``alive =
False`` (readiness fails) and, with ``start = auto``, starts it again; with ``external`` it waits for the
service manager to.

``RemoteJournal`` is the gate's journal as the drain steps see it (``JournalAccess``), one control
call per use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from spotguard.config import Config, to_dict, to_toml
from spotguard.deadline import Deadline
from spotguard.errors import GateError
from spotguard.gate.control import GateConnection, call, control_path
from spotguard.gate.protocol import DesiredState, HeldState, JournalEntry, entries_from_wire
from spotguard.metrics import Metrics

WATCH_INTERVAL = 1.0
"""Seconds between liveness checks (stats calls) of an attached gate."""
CALL_TIMEOUT = 5.0
"""Seconds one control call may take (an interrupt: its own timeout on top)."""
START_TIMEOUT = 20.0
"""Seconds a gate the daemon started may take to answer on its control socket."""
RETRY_MIN, RETRY_MAX = 0.2, 5.0
"""Backoff in seconds between attempts to reach (or start) a gate that is not there."""


class RemoteJournal:
    """The gate process's journal, one control call per use (``JournalAccess``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def count(self) -> int:
        return int((await call(self.path, "stats", timeout=CALL_TIMEOUT))["inflight"])

    async def entries(self) -> list[JournalEntry]:
        return entries_from_wire(await call(self.path, "journal", timeout=CALL_TIMEOUT))

    async def interrupt_and_wait(self, timeout: float) -> list[JournalEntry]:
        return entries_from_wire(await call(self.path, "interrupt", timeout=timeout + CALL_TIMEOUT, seconds=timeout))

    async def release(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            await call(self.path, "release", timeout=CALL_TIMEOUT, ids=list(request_ids))


class GateLink:
    """The daemon's handle on the gate process: ``alive``, ``declare``, ``journal``."""

    def __init__(self, config: Config, metrics: Metrics, *, log: structlog.stdlib.BoundLogger) -> None:
        self.config = config
        self.path = control_path(config)
        self.journal = RemoteJournal(self.path)
        self.alive = False
        """True while the gate answers its control socket (kept current by ``run``)."""
        self.pid: int | None = None
        self.holding: HeldState | None = None
        """What the gate said it holds, at the last declaration or stats call."""
        self._metrics = metrics
        self._log = log
        self._wanted = DesiredState(generation=0, draining=False, peers=config.gate.peers)
        self._deadline: Deadline | None = None
        self._legacy = False
        """The gate running predates the declared state (it answers only the old ``draining`` op)."""
        self._seen_seams = 0
        self._seen_tokens = 0
        self._dirty = False
        """A declaration not pushed yet."""
        self._changed = anyio.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._seen: dict[tuple[str, str], int] = {}
        self._seen_limits: dict[str, int] = {}
        self._seen_resume: dict[tuple[str, ...], int] = {}

    @property
    def draining(self) -> bool:
        return self._wanted.draining

    @property
    def wanted(self) -> DesiredState:
        return self._wanted

    @property
    def deadline(self) -> Deadline | None:
        """The node's deadline as last declared."""
        return self._deadline

    def declare(self, *, draining: bool, deadline: Deadline | None) -> None:
        """What the gate must hold from now on: refuse new requests (or hand them to peers) or not, and the
        node's deadline (the VM's, and the drain's). The daemon calls it on every change of either; ``run``
        pushes it at once, and again whenever it (re)attaches, so the gate always holds the last declared
        state, whoever restarted."""
        self._deadline = deadline
        self._wanted = DesiredState(generation=self._wanted.generation + 1, draining=draining,
                                    vm_deadline=deadline.vm if deadline is not None else None,
                                    drain_deadline=deadline.drain if deadline is not None else None,
                                    peers=self.config.gate.peers)
        self._dirty = True
        self._changed.set()

    async def _push(self, connection: GateConnection) -> None:
        """Declare the wanted state and check that the gate holds it."""
        wanted = self._wanted
        self._dirty = False
        if self._legacy:
            vm = wanted.vm_deadline.timestamp() if wanted.vm_deadline else None
            await connection.request("draining", timeout=CALL_TIMEOUT, on=wanted.draining, deadline=vm)
            return
        try:
            answer = await connection.request("declare", timeout=CALL_TIMEOUT, state=wanted.to_wire())
        except GateError as exc:
            if "unknown op" not in str(exc):
                raise
            self._legacy = True
            self._log.warning("gate_outdated", why="the running gate does not know declared states; restart it "
                              "(spotguard gate --stop) to get every deadline change")
            await self._push(connection)
            return
        self._check(answer.get("holding"), wanted)

    def _check(self, holding: Any, wanted: DesiredState) -> None:
        try:
            held = HeldState.from_wire(holding)
        except GateError as exc:
            self._log.error("gate_state_unreadable", error=str(exc))
            return
        self.holding = held
        if not held.holds(wanted):
            # A gate restarted by hand, or one that refused part of it: declare again at the next check.
            self._dirty = True
            self._log.warning("gate_state_differs", wanted=wanted.to_wire(), holding=held.to_wire())

    def describe(self) -> dict[str, Any]:
        return {"alive": self.alive, "pid": self.pid, "control_socket": self.path, "start": self.config.gate.start}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Attach to (or start) the gate and watch it until cancelled.

        Reports started after the first attempt, whatever its outcome: a daemon without its gate still
        watches for notices (and says, through ``alive`` and readiness, that the gate is missing).
        """
        started = False
        delay = RETRY_MIN
        attempt = 0
        while True:
            try:
                connection = await self._attach(attempt)
            except GateError as exc:
                self._down_state()
                if attempt == 0 or delay >= RETRY_MAX:
                    self._log.error("gate_unavailable", error=str(exc), start=self.config.gate.start,
                                    retry_in=delay)
                self._metrics.config_errors.labels(component="gate", reason="unavailable").inc()
                if not started:
                    task_status.started()
                    started = True
                attempt += 1
                await anyio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            attempt, delay = 0, RETRY_MIN
            self.alive = True
            self._metrics.gate_up.set(1)
            if not started:
                task_status.started()
                started = True
            try:
                await self._watch(connection)
            except GateError as exc:
                self._down_state()
                self._metrics.gate_failures.inc()
                code = self._reap()
                self._log.error("gate_down", pid=self.pid, error=str(exc),
                                exit_code=code, restart=self.config.gate.start == "auto")
            finally:
                await connection.aclose()

    def _down_state(self) -> None:
        self.alive = False
        self._metrics.gate_up.set(0)

    async def _attach(self, attempt: int) -> GateConnection:
        try:
            connection = await GateConnection.open(self.path)
        except GateError:
            if self.config.gate.start != "auto":
                raise
            await self._start()
            connection = await GateConnection.open(self.path)
        try:
            hello = await connection.request("hello", timeout=CALL_TIMEOUT)
            self._legacy = "holding" not in hello
            await self._push(connection)
        except GateError:
            await connection.aclose()
            raise
        self.pid = int(hello.get("pid", 0)) or None
        self._seen = {}
        self._seen_limits = {}
        self._seen_resume = {}
        self._seen_seams = self._seen_tokens = 0  # a gate (re)attached counts from its own start
        mine = (self.config.gate.listen, self.config.gate.upstream)
        if (hello.get("listen"), hello.get("upstream")) != mine:
            # Not ours to restart with requests in flight: say so; `spotguard gate --stop` then restart.
            self._log.warning("gate_config_differs", running={"listen": hello.get("listen"),
                              "upstream": hello.get("upstream")}, configured={"listen": mine[0], "upstream": mine[1]})
        self._log.info("gate_attached", pid=self.pid, version=hello.get("version"), started_at=hello.get("started_at"),
                       inflight=hello.get("inflight"), started_by_us=self._child is not None)
        return connection

    async def _watch(self, connection: GateConnection) -> None:
        while True:
            with anyio.move_on_after(WATCH_INTERVAL):
                await self._changed.wait()
            self._changed = anyio.Event()
            if self._dirty:
                await self._push(connection)
            stats = await connection.request("stats", timeout=CALL_TIMEOUT)
            if not self._legacy:
                self._check(stats.get("holding"), self._wanted)
            self._mirror(stats)

    def _mirror(self, stats: dict[str, Any]) -> None:
        self._metrics.gate_inflight.set(float(stats.get("inflight", 0)))
        self._mirror_migrations(stats)
        for row in stats.get("requests", ()):
            try:
                endpoint, result, count = str(row[0]), str(row[1]), int(row[2])
            except (IndexError, TypeError, ValueError):
                continue
            delta = count - self._seen.get((endpoint, result), 0)
            if delta > 0:
                self._metrics.gate_requests.labels(endpoint=endpoint, result=result).inc(delta)
            self._seen[(endpoint, result)] = count
        for row in stats.get("limits", ()):
            try:
                limit, count = str(row[0]), int(row[1])
            except (IndexError, TypeError, ValueError):
                continue
            delta = count - self._seen_limits.get(limit, 0)
            if delta > 0:
                self._metrics.gate_limits.labels(limit=limit).inc(delta)
            self._seen_limits[limit] = count

    def _mirror_migrations(self, stats: dict[str, Any]) -> None:
        seams, gaps, tokens = stats.get("seams"), stats.get("seam_gaps"), stats.get("reprefilled_tokens")
        if not isinstance(seams, int) or not isinstance(gaps, list) or not isinstance(tokens, int):
            return
        new = seams - self._seen_seams
        if new > 0:  # the newest gaps are last; a gate restarted since counts from 0 again (new <= 0)
            for gap in gaps[-new:]:
                if isinstance(gap, (int, float)):
                    self._metrics.gate_seam_gap.observe(float(gap))
        if tokens > self._seen_tokens:
            self._metrics.gate_reprefilled_tokens.inc(tokens - self._seen_tokens)
        self._seen_seams, self._seen_tokens = seams, tokens
        held = stats.get("resume")
        if isinstance(held, dict):
            answers, size = held.get("answers"), held.get("bytes")
            if isinstance(answers, int) and isinstance(size, int):
                self._metrics.resume_held_answers.set(answers)
                self._metrics.resume_held_bytes.set(size)
            for row in held.get("evictions", ()):
                self._count_up("evictions", row, self._metrics.resume_evictions, "reason")
            for row in held.get("index", ()):
                self._count_up("index", row, self._metrics.resume_index, "op", "result")

    def _count_up(self, kind: str, row: Any, counter: Any, *labels: str) -> None:
        """A counter of the gate's (``row``: its label values, then the count so far) onto the daemon's."""
        try:
            values, count = tuple(str(v) for v in row[:-1]), int(row[-1])
        except (IndexError, TypeError, ValueError):
            return
        if len(values) != len(labels):
            return
        key = (kind, *values)
        delta = count - self._seen_resume.get(key, 0)
        if delta > 0:
            counter.labels(**dict(zip(labels, values, strict=True))).inc(delta)
        self._seen_resume[key] = count

    async def _start(self) -> None:
        """Start ``spotguard gate`` in a session of its own and wait until its control socket answers."""
        self._reap()
        state = Path(self.config.agent.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        settings = state / "gate.toml"
        # Only what the gate reads (never the whole file: webhook URLs and such are nobody else's).
        # Resume: the fleet key, the answers' index in the snapshot store (and that store's encryption key).
        own = Config(agent=self.config.agent, control=self.config.control, resume=self.config.resume,
                     snapshot=self.config.snapshot).replace(
            "gate", **{**to_dict(self.config)["gate"], "control_socket": self.path}).replace(
            "server", kind=self.config.server.kind)  # the shape of a continuation depends on the engine
        fd = os.open(settings, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(to_toml(own))
        log_path = state / "gate.log"
        with open(log_path, "ab") as out:
            child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "spotguard", "gate", "--config", str(settings)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._child = child
        self._log.info("gate_starting", pid=child.pid, log=str(log_path))
        with anyio.move_on_after(START_TIMEOUT):
            while child.poll() is None:
                try:
                    connection = await GateConnection.open(self.path, 0.5)
                except GateError:
                    await anyio.sleep(0.02)  # process start-up, bounded by START_TIMEOUT
                    continue
                await connection.aclose()
                self._metrics.gate_starts.inc()
                return
        code = self._reap()
        raise GateError(f"the gate did not come up within {START_TIMEOUT:.0f}s (exit code {code}); "
                        f"see {log_path}")

    def _reap(self) -> int | None:
        """Collect a child gate that has exited (no zombie left behind); its exit code, if it exited."""
        child = self._child
        if child is None:
            return None
        code = child.poll()
        if code is not None:
            self._child = None
        return code

