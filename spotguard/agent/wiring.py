"""Builds the daemon's collaborators from the configuration, once, at start-up.

Everything slow or fallible (cloud detection, identity, boto3 clients, hashing the model file) happens
here, before the node reports ready, so a drain never pays for it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup

from spotguard import logs
from spotguard.agent.runner import Agent, Timeline
from spotguard.config import Config
from spotguard.drain.engine import DrainEngine
from spotguard.drain.plan import plan
from spotguard.drain.step import DrainContext, drain_deadline
from spotguard.drain.timeline import Timeline as DrainTimeline
from spotguard.errors import ConfigError, SpotguardError
from spotguard.gate.link import GateLink
from spotguard.metrics import Metrics
from spotguard.notice import Notice, NoticeSource
from spotguard.services import Identity, Services

IDENTITY_TIMEOUT = 10.0


async def detect(config: Config, http: httpx.AsyncClient) -> str:
    from spotguard.clouds.detect import detect_cloud

    return await detect_cloud(config, http)


def cloud_sources(cloud: str, config: Config, http: httpx.AsyncClient) -> list[NoticeSource]:
    if cloud == "aws":
        from spotguard.clouds import aws

        return list(aws.build_sources(config, http))
    if cloud == "gcp":
        from spotguard.clouds import gcp

        return list(gcp.build_sources(config, http))
    if cloud == "azure":
        from spotguard.clouds import azure

        return list(azure.build_sources(config, http))
    return []


async def cloud_identity(cloud: str, config: Config, http: httpx.AsyncClient, log: Any) -> Identity:
    """Who this VM is; a failure is logged and falls back to the hostname (the drain still runs)."""
    fallback = Identity(cloud=cloud, instance_id=config.agent.instance_id or socket.gethostname())
    if cloud == "none":
        return fallback
    module: Any
    if cloud == "aws":
        from spotguard.clouds import aws as module
    elif cloud == "gcp":
        from spotguard.clouds import gcp as module
    else:
        from spotguard.clouds import azure as module
    try:
        with anyio.fail_after(IDENTITY_TIMEOUT):
            found: Identity = await module.identity(config, http)
    except (SpotguardError, TimeoutError) as exc:
        log.error("identity_unavailable", cloud=cloud, error=str(exc) or "timeout", fallback=fallback.instance_id)
        return fallback
    if config.agent.instance_id:
        found = Identity(cloud=found.cloud, instance_id=config.agent.instance_id, private_ip=found.private_ip,
                         region=found.region, zone=found.zone, vm_name=found.vm_name)
    return found


class EngineDriver:
    """Adapts the drain engine to the runner's ``DrainDriver``: one ``DrainEngine`` per drain."""

    def __init__(self, config: Config, metrics: Metrics, http: httpx.AsyncClient,
                 services: Callable[[], Services]) -> None:
        self.config = config
        self.metrics = metrics
        self.http = http
        self.services = services
        self._current: DrainEngine | None = None

    async def run(self, notice: Notice, timeline: Timeline, *, dry_run: bool,
                  on_change: Callable[[Timeline], None]) -> Timeline:
        ctx = DrainContext(config=self.config, notice=notice, deadline=drain_deadline(self.config, notice),
                           dry_run=dry_run, metrics=self.metrics, log=logs.get("drain"), http=self.http,
                           services=self.services())
        resumed = None
        if timeline:
            try:
                resumed = DrainTimeline.from_json(timeline[0]) if len(timeline) == 1 and "steps" in timeline[0] \
                    else None
            except SpotguardError:
                resumed = None
        engine = DrainEngine(plan(self.config), ctx, timeline=resumed,
                             on_change=lambda t: on_change([t.to_json()]))
        if not dry_run:
            self._current = engine
        try:
            finished = await engine.run()
        finally:
            if self._current is engine:
                self._current = None
        return [finished.to_json()]

    def tighten(self, deadline: datetime) -> None:
        """``deadline`` is a notice deadline; the engine works to it minus the safety margin."""
        if self._current is not None:
            self._current.tighten(deadline - timedelta(seconds=self.config.drain.safety_margin))


@dataclass
class Wiring:
    config: Config
    cloud: str
    metrics: Metrics
    sources: list[NoticeSource]
    identity: Identity
    http: httpx.AsyncClient
    gate: GateLink | None = None
    """The gate process's handle (``alive``, ``set_draining``, ``journal``); None when no gate is set."""
    services: Services | None = None
    driver: EngineDriver | None = None
    agent: Agent | None = None

    def bind_agent(self, agent: Agent) -> None:
        self.agent = agent
        if self.gate is not None and agent.state != "serving":
            self.gate.set_draining(True)

    def set_ready(self, ready: bool) -> None:
        if self.gate is not None:
            self.gate.set_draining(not ready)

    async def start_listeners(self, tg: TaskGroup, agent: Agent) -> None:
        from spotguard.control.server import serve_control
        from spotguard.gpu import GpuMonitor

        await tg.start(lambda task_status: serve_control(self.config.control, agent, log=logs.get("control"),
                                                         metrics=self.metrics, task_status=task_status),
                       name="control")
        if self.gate is not None:
            await tg.start(self.gate.run, name="gate-link")
        tg.start_soon(GpuMonitor(self.metrics, log=logs.get("gpu")).run, name="gpu")

    def refresh_gpu(self) -> None:
        """GPU gauges are refreshed by the monitor task; nothing to do per scrape."""

    def describe(self) -> dict[str, Any]:
        return {"instance_id": self.identity.instance_id, "gate": self.config.gate.listen or None,
                "gate_process": self.gate.describe() if self.gate is not None else None,
                "snapshot": bool(self.config.snapshot.url),
                "balancers": [b.name for b in (self.services.balancers if self.services else ())]}


async def build_wiring(config: Config, http: httpx.AsyncClient) -> Wiring:
    from spotguard.lb.build import build_balancers
    from spotguard.servers.registry import build_engine

    log = logs.get("wiring")
    metrics = Metrics()
    cloud = await detect(config, http)
    identity = await cloud_identity(cloud, config, http, log)
    wiring = Wiring(config=config, cloud=cloud, metrics=metrics, sources=cloud_sources(cloud, config, http),
                    identity=identity, http=http)
    if config.gate.listen:
        if not config.gate.upstream:
            raise ConfigError("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
        wiring.gate = GateLink(config, metrics, log=logs.get("gate"))
    gate = wiring.gate
    engine = build_engine(config, http, journal=gate.journal if gate is not None else None,
                          set_gate_draining=(lambda: gate.set_draining(True)) if gate is not None else None)
    balancers = build_balancers(config, http, identity, metrics=metrics)
    snapshot = None
    if config.snapshot.url:
        from spotguard.storage.snapshot import prepare

        snapshot = await prepare(config)
    acknowledge = None
    if cloud == "azure" and config.azure.acknowledge:
        from spotguard.clouds import azure

        async def acknowledge(event_id: str) -> str:
            return await azure.approve(config, http, event_id)

    wiring.services = Services(identity=identity, engine=engine, balancers=balancers,
                               journal=gate.journal if gate is not None else None,
                               set_ready=wiring.set_ready, acknowledge=acknowledge, snapshot=snapshot)
    services = wiring.services
    wiring.driver = EngineDriver(config, metrics, http, lambda: services)
    return wiring
