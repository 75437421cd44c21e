"""Builds the daemon's collaborators from the configuration, once, at start-up.

Two phases: ``build_wiring`` builds what needs no network (engine adapter, gate, snapshot store), so the
daemon listens and captures signals at once; ``Wiring.attach_cloud`` then finds the cloud, the VM's
identity and its load balancers (boto3 clients built once here, not in a drain) in the background.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.abc import TaskGroup

from spotguard import logs
from spotguard.agent.runner import Agent
from spotguard.clouds.identity import Identity
from spotguard.clouds.operator import undrain_notice
from spotguard.clouds.registry import cloud_identity, cloud_sources, find_cloud
from spotguard.config import Config
from spotguard.deadline import Deadline
from spotguard.drain.engine import DrainEngine
from spotguard.drain.plan import plan
from spotguard.drain.step import DrainContext
from spotguard.drain.timeline import Timeline
from spotguard.drain.undo import undo_plan
from spotguard.errors import ConfigError
from spotguard.gate.link import GateLink
from spotguard.metrics import Metrics
from spotguard.notice import Notice
from spotguard.services import Services

if TYPE_CHECKING:
    from spotguard.storage.snapshot import Snapshotter

ATTACH_WAIT = 5.0
"""Most seconds a drain right after start-up waits for the cloud's identity and balancers."""


class EngineDriver:
    """Adapts the drain engine to the agent's ``DrainDriver``: one ``DrainEngine`` per drain or restore."""

    def __init__(self, config: Config, metrics: Metrics, http: httpx.AsyncClient,
                 services: Callable[[], Services], attached: anyio.Event) -> None:
        self.config = config
        self.metrics = metrics
        self.http = http
        self.services = services
        self.attached = attached
        self._current: DrainEngine | None = None
        self._deadline: Deadline | None = None
        """The running drain's deadline: a tighten while it waits for the cloud still reaches its engine."""

    async def _cloud_services(self, deadline: Deadline) -> Services:
        """The services once the cloud's identity and balancers are known: a drain right after start-up
        waits a little for them rather than skip deregistration for good."""
        if not self.attached.is_set():
            with anyio.move_on_after(min(ATTACH_WAIT, max(0.0, deadline.seconds_left() / 4))):
                await self.attached.wait()
        return self.services()

    async def run(self, notice: Notice, deadline: Deadline, resumed: Timeline | None, *, dry_run: bool,
                  on_change: Callable[[Timeline], None]) -> Timeline:
        if not dry_run:
            self._deadline = deadline
        services = await self._cloud_services(deadline)
        if not dry_run and self._deadline is not None:
            deadline = self._deadline  # tightened while the cloud was being waited for
        ctx = DrainContext(config=self.config, notice=notice, deadline=deadline, dry_run=dry_run,
                           metrics=self.metrics, log=logs.get("drain"), http=self.http, services=services)
        engine = DrainEngine(plan(self.config), ctx, timeline=resumed, on_change=on_change)
        if not dry_run:
            self._current = engine
        try:
            return await engine.run()
        finally:
            if self._current is engine:
                self._current, self._deadline = None, None

    async def restore(self, drained: Timeline | None, resumed: Timeline | None, *,
                      on_change: Callable[[Timeline], None]) -> Timeline:
        notice = undrain_notice(self.config.drain.restore_budget)
        deadline = Deadline.for_notice(notice, 0.0)  # the undo steps work to their own budget: no margin
        ctx = DrainContext(config=self.config, notice=notice, deadline=deadline, dry_run=False, metrics=self.metrics,
                           log=logs.get("undrain"), http=self.http, services=await self._cloud_services(deadline))
        engine = DrainEngine(undo_plan(drained), ctx, timeline=resumed, on_change=on_change, background=(),
                             purpose="restore")
        return await engine.run()

    def tighten(self, deadline: Deadline) -> None:
        """An earlier deadline for the drain under way (the engine keeps the earlier of the two)."""
        if self._deadline is not None and deadline.drain < self._deadline.drain:
            self._deadline = deadline
        if self._current is not None:
            self._current.tighten(deadline)


@dataclass
class Wiring:
    config: Config
    cloud: str
    """``unknown`` until [agent] cloud = auto is confirmed (``attach_cloud``)."""
    metrics: Metrics
    identity: Identity
    http: httpx.AsyncClient
    gate: GateLink | None = None
    """The gate process's handle (``alive``, ``declare``, ``journal``); None when no gate is set."""
    services: Services | None = None
    driver: EngineDriver | None = None
    attached: anyio.Event = field(default_factory=anyio.Event)
    """Set once the cloud's sources, identity and balancers are in place."""
    problem: str = ""
    """Why attaching the cloud failed, for status (a setting that cannot work)."""
    snapshotter: Snapshotter | None = None

    def start_background(self, tg: TaskGroup) -> None:
        """Slow start-up work that must not hold READY: hashing the model file for KV stamps."""
        if self.snapshotter is not None:
            tg.start_soon(self.snapshotter.stamp_model, logs.get("snapshot"), name="model-hash")

    def refuse_new_work(self, refuse: bool) -> None:
        """The gate refuses new requests (the readiness step) or takes them again (an undrain's reopen_gate)."""
        if self.gate is not None:
            self.gate.declare(draining=refuse, deadline=self.gate.deadline)

    def deadline_changed(self, deadline: Deadline | None) -> None:
        """The node's deadline moved (``DeadlineOwner``): the gate ends what it relays from peers before it,
        also once the drain is over."""
        if self.gate is not None:
            self.gate.declare(draining=self.gate.draining, deadline=deadline)

    def gate_draining(self) -> bool:
        return bool(self.gate is not None and self.gate.draining)

    def gate_alive(self) -> bool:
        """The gate process answers its control socket (True when no gate is configured)."""
        return self.gate is None or self.gate.alive

    async def start_listeners(self, tg: TaskGroup, agent: Agent) -> None:
        from spotguard.control.server import serve_control
        from spotguard.gpu import GpuMonitor

        if self.gate is not None:
            # Declared before the link attaches: a node restarted mid-drain refuses new work from the first
            # request, and its gate holds the deadline rebuilt from the persisted state.
            agent.deadline.listen(self.deadline_changed)
            self.refuse_new_work(agent.node.refuses_new_work())
        await tg.start(lambda task_status: serve_control(self.config.control, agent.operator, log=logs.get("control"),
                                                         metrics=self.metrics, task_status=task_status),
                       name="control")
        if self.gate is not None:
            await tg.start(self.gate.run, name="gate-link")
        tg.start_soon(GpuMonitor(self.metrics, log=logs.get("gpu")).run, name="gpu")

    async def attach_cloud(self, agent: Agent) -> None:
        """Find the cloud, who this VM is, and its load balancers; then start watching its notices."""
        log = logs.get("wiring")
        config, http = self.config, self.http
        cloud = await find_cloud(config, http, log, self.metrics)
        identity = await cloud_identity(cloud, config, http, log)
        from spotguard.lb.build import build_balancers

        try:
            balancers = build_balancers(config, http, identity, metrics=self.metrics)
        except ConfigError as exc:
            # Before READY this ends start-up (the daemon exits naming the key); later it is loud in status.
            self.problem = str(exc)
            raise
        acknowledge = None
        if cloud == "azure" and config.azure.acknowledge:
            from spotguard.clouds import azure

            async def acknowledge(event_id: str) -> str:
                return await azure.approve(config, http, event_id)

        assert self.services is not None
        self.services = dataclasses.replace(self.services, identity=identity, balancers=balancers,
                                            acknowledge=acknowledge)
        self.identity, self.cloud = identity, cloud
        agent.operator.cloud = cloud
        self.metrics.cloud_known.set(1)
        agent.add_sources(cloud_sources(cloud, config, http))
        self.attached.set()
        log.info("cloud_attached", cloud=cloud, instance_id=identity.instance_id,
                 balancers=[b.name for b in balancers])

    def status(self) -> dict[str, Any]:
        """The cloud part of /status: whether the cloud is confirmed, and what went wrong attaching it."""
        return {"cloud_attached": self.attached.is_set(), "cloud_problem": self.problem or None}


async def build_wiring(config: Config, http: httpx.AsyncClient) -> Wiring:
    """Everything that needs no network: the daemon can listen and capture signals at once.

    The cloud (its notices, identity and balancers) is attached by ``Wiring.attach_cloud`` in the
    background; until then the node drains on SIGTERM and manual drains with what is known.
    """
    from spotguard.servers.registry import build_engine

    metrics = metrics_for(config)
    identity = Identity(cloud="none", instance_id=config.agent.instance_id or socket.gethostname())
    cloud = config.agent.cloud if config.agent.cloud != "auto" else "unknown"
    wiring = Wiring(config=config, cloud=cloud, metrics=metrics, identity=identity, http=http)
    if config.gate.listen:
        if not config.gate.upstream:
            raise ConfigError("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
        wiring.gate = GateLink(config, metrics, log=logs.get("gate"))
    gate = wiring.gate
    engine = build_engine(config, http)
    snapshot = None
    if config.snapshot.url:
        from spotguard.storage.snapshot import prepare

        snapshot = wiring.snapshotter = await prepare(config)
    wiring.services = Services(identity=identity, engine=engine,
                               journal=gate.journal if gate is not None else None,
                               refuse_new_work=wiring.refuse_new_work, snapshot=snapshot)

    def services() -> Services:
        assert wiring.services is not None
        return wiring.services

    wiring.driver = EngineDriver(config, metrics, http, services, wiring.attached)
    return wiring


def metrics_for(config: Config) -> Metrics:
    metrics = Metrics()
    metrics.cloud_known.set(0 if config.agent.cloud == "auto" else 1)
    return metrics
