"""The daemon's lifecycle in one place: capture signals -> start listeners and sources -> main loop -> shutdown.

Signals are captured before anything else, so one that arrives during start-up is handled, not fatal.
READY=1 (and /readyz 200) come only once the gate listens and the engine's health has been checked.

SIGTERM while serving drains when the machine is going away (``[shutdown] trigger``: by default only while
systemd says the system is stopping, or when that cannot be told); otherwise it is a restart of spotguard
itself and the daemon exits at once. SIGTERM during a drain brings that drain's deadline to ``[shutdown]
budget`` when the machine is going away, and otherwise exits at once, leaving the drain persisted for the
restarted daemon to finish. A second SIGTERM or SIGINT forces exit at once. SIGINT alone (an operator's
Ctrl-C) stops without draining.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus

from spotguard import __version__, asgi, logs, sdnotify
from spotguard.agent.readiness import Readiness
from spotguard.agent.runner import Agent
from spotguard.agent.state import StateStore
from spotguard.agent.wiring import Wiring, build_wiring
from spotguard.api import HttpApi
from spotguard.clouds.operator import shutdown_notice, system_is_stopping
from spotguard.config import Config, parse_listen
from spotguard.errors import ConfigError

READY_WAIT_FOR_CLOUD = 2.0
"""Seconds start-up waits for the cloud to attach before READY (it goes on in the background after)."""


async def run_daemon(config: Config, *, task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> int:
    """Run until a signal ends it; returns the process exit code."""
    daemon = Daemon(config)
    return await daemon.run(task_status=task_status)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = logs.get("daemon")
        self.exit_code = 0
        self.http_bound: asgi.Bound | None = None
        self.wiring: Wiring | None = None
        self.agent: Agent | None = None
        self.readiness: Readiness | None = None

    async def run(self, *, task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> int:
        config = self.config
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        # Signals first: a SIGTERM during start-up waits in the receiver and is handled once the agent runs.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
                wiring = self.wiring = await build_wiring(config, http)
                assert wiring.driver is not None
                agent = self.agent = Agent(config=config, cloud=wiring.cloud, metrics=wiring.metrics,
                                           log=logs.get("runner"), store=StateStore(config.agent.state_dir),
                                           sources=[], driver=wiring.driver)
                readiness = self.readiness = Readiness(config, http, wiring.metrics, state=lambda: agent.node.state,
                                                       gate_draining=wiring.gate_draining, gate_alive=wiring.gate_alive,
                                                       log=logs.get("readiness"))
                agent.operator.status_extras += [lambda: {"readiness": readiness.describe()}, wiring.status]
                async with anyio.create_task_group() as tg:
                    await tg.start(agent.run, name="runner")
                    tg.start_soon(self._attach, wiring, agent, name="attach-cloud")
                    host, port = parse_listen(config.http.listen, "[http] listen")
                    api = HttpApi(agent.operator, wiring.metrics, readiness.verdict)
                    self.http_bound = await tg.start(asgi.serve_tcp, api, host, port, name="http")
                    await wiring.start_listeners(tg, agent)
                    await tg.start(readiness.run, name="readiness")
                    wiring.start_background(tg)
                    with anyio.move_on_after(READY_WAIT_FOR_CLOUD):
                        await wiring.attached.wait()
                    if wiring.problem:  # a setting that cannot work: refuse to start rather than run blind
                        self.exit_code = 2
                        tg.cancel_scope.cancel()
                        return self.exit_code
                    tg.start_soon(self._watchdog, name="watchdog")
                    self.log.info("started", version=__version__, cloud=wiring.cloud, http=self.http_bound.url,
                                  sources=[s.name for s in agent.watcher.sources], state=agent.node.state,
                                  engine=config.server.kind, dry_run=config.agent.dry_run,
                                  ready=readiness.verdict()[0], gate=config.gate.listen or None,
                                  snapshot=bool(config.snapshot.url))
                    sdnotify.notify("READY=1", f"STATUS={agent.node.state} ({wiring.cloud})")
                    task_status.started(self)
                    await self._handle_signals(tg, agent, signals)
        sdnotify.notify("STOPPING=1")
        self.log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _attach(self, wiring: Wiring, agent: Agent) -> None:
        try:
            await wiring.attach_cloud(agent)
        except ConfigError as exc:
            wiring.metrics.config_errors.labels(component="wiring", reason="balancers").inc()
            self.log.error("cloud_attach_failed", error=str(exc))
        if wiring.cloud == "none":
            self.log.warning("no_cloud", message="no cloud detected or configured: only the OS "
                             "shutdown and manual drain sources are running")

    async def _handle_signals(self, tg: TaskGroup, agent: Agent, signals: AsyncIterator[int]) -> None:
        stopping = False
        async for signum in signals:
            if stopping:
                self.log.warning("forced_exit", signal=signal.Signals(signum).name)
                self.exit_code = 1
                tg.cancel_scope.cancel()
                return
            stopping = True
            sdnotify.notify("STOPPING=1")
            tg.start_soon(self._stop, tg, agent, signum, name="shutdown")

    async def _machine_going_away(self) -> bool:
        shutdown = self.config.shutdown
        if shutdown.trigger == "always":
            return True
        stopping = await anyio.to_thread.run_sync(system_is_stopping)
        if stopping is None:
            self.log.warning("system_state_unknown", action="treating SIGTERM as the machine going away")
        return stopping is not False

    async def _stop(self, tg: TaskGroup, agent: Agent, signum: int) -> None:
        name = signal.Signals(signum).name
        shutdown = self.config.shutdown
        going_away = signum == signal.SIGTERM and shutdown.enabled and await self._machine_going_away()
        if going_away and agent.node.state in ("serving", "restoring"):
            self.log.warning("shutdown_notice", signal=name, budget=shutdown.budget)
            agent.notices.inject(shutdown_notice(shutdown.budget))
            await self._wait_for_drain(agent, shutdown.budget)
        elif going_away and agent.node.state == "draining":
            agent.node.shorten_drain(shutdown.budget, why=f"{name} while draining")
            await self._wait_for_drain(agent, shutdown.budget)
        elif agent.node.state == "draining":
            self.log.warning("drain_left_for_restart", signal=name,
                             message="the machine is not shutting down: the restarted daemon resumes this drain")
        self.log.info("stopping", signal=name, state=agent.node.state)
        tg.cancel_scope.cancel()

    async def _wait_for_drain(self, agent: Agent, budget: float) -> None:
        with anyio.move_on_after(budget + 1) as scope:
            while agent.node.state != "drained":
                await agent.node.wait_drained()
        if scope.cancelled_caught:
            self.log.error("drain_overran_shutdown_budget", budget=budget)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await anyio.sleep(interval)


def describe(config: Config) -> dict[str, Any]:
    return {"listen": config.http.listen, "control": config.control.socket}
