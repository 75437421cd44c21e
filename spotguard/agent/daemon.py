"""The daemon's lifecycle in one place: capture signals -> start listeners and sources -> main loop -> shutdown.

SIGTERM while serving is itself a notice (the OS shutdown is often GCP's only warning): the daemon drains
within ``[shutdown] budget`` and then exits. SIGTERM during a drain lets the drain finish within its
budget. A second SIGTERM or SIGINT forces exit at once. SIGINT alone (an operator's Ctrl-C) stops without
draining a serving node.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus

from spotguard import __version__, asgi, logs, sdnotify
from spotguard.agent.runner import Agent
from spotguard.agent.state import StateStore
from spotguard.agent.wiring import Wiring, build_wiring
from spotguard.api import HttpApi
from spotguard.clouds.operator import shutdown_notice, system_is_stopping
from spotguard.config import Config, parse_listen

GPU_REFRESH_SECONDS = 15.0


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

    async def run(self, *, task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> int:
        config = self.config
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
            wiring = self.wiring = await build_wiring(config, http)
            assert wiring.driver is not None
            agent = self.agent = Agent(config=config, cloud=wiring.cloud, metrics=wiring.metrics,
                                       log=logs.get("runner"), store=StateStore(config.agent.state_dir),
                                       sources=wiring.sources, driver=wiring.driver)
            wiring.bind_agent(agent)
            # Signals are captured before anything listens, so a SIGTERM right after start-up still drains.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with anyio.create_task_group() as tg:
                    host, port = parse_listen(config.http.listen, "[http] listen")
                    api = HttpApi(agent, wiring.metrics, before_metrics=wiring.refresh_gpu)
                    self.http_bound = await tg.start(asgi.serve_tcp, api, host, port, name="http")
                    await wiring.start_listeners(tg, agent)
                    await tg.start(agent.run, name="runner")
                    tg.start_soon(self._watchdog, name="watchdog")
                    self.log.info("started", version=__version__, cloud=wiring.cloud, http=self.http_bound.url,
                                  sources=[s.name for s in wiring.sources], state=agent.state,
                                  engine=config.server.kind, dry_run=config.agent.dry_run, **wiring.describe())
                    if wiring.cloud == "none":
                        self.log.warning("no_cloud", message="no cloud detected or configured: only the OS "
                                         "shutdown and manual drain sources are running")
                    sdnotify.notify("READY=1", f"STATUS=serving ({wiring.cloud})")
                    task_status.started(self)
                    await self._handle_signals(tg, agent, signals)
        sdnotify.notify("STOPPING=1")
        self.log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

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
            tg.start_soon(self._stop_after_drain, tg, agent, signum, name="shutdown")

    async def _stop_after_drain(self, tg: TaskGroup, agent: Agent, signum: int) -> None:
        name = signal.Signals(signum).name
        shutdown = self.config.shutdown
        trigger_drain = (signum == signal.SIGTERM and shutdown.enabled and agent.state == "serving"
                         and (shutdown.trigger == "always" or await anyio.to_thread.run_sync(system_is_stopping)))
        if trigger_drain:
            self.log.warning("shutdown_notice", signal=name, budget=shutdown.budget)
            agent.inject(shutdown_notice(shutdown.budget))
        if trigger_drain or agent.state == "draining":
            notice = agent.notice
            limit = shutdown.budget if notice is None else max(1.0, notice.seconds_left())
            with anyio.move_on_after(limit + 1) as scope:
                while agent.state != "drained":
                    await agent.wait_drained()
            if scope.cancelled_caught:
                self.log.error("drain_overran_shutdown_budget", budget=limit)
        self.log.info("stopping", signal=name, state=agent.state)
        tg.cancel_scope.cancel()

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await anyio.sleep(interval)


def describe(config: Config) -> dict[str, Any]:
    return {"listen": config.http.listen, "control": config.control.socket}
