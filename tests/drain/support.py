"""Shared pieces of the drain tests: a real webhook receiver, honest fakes of other areas' adapters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
import structlog

from spotguard.asgi import Receive, Scope, Send, read_body, respond, serve_tcp
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.deadline import Deadline
from spotguard.drain.step import DrainContext
from spotguard.errors import EngineError, LoadBalancerError
from spotguard.gate.journal import JournalAccess
from spotguard.metrics import Metrics
from spotguard.notice import Notice, utcnow, window
from spotguard.services import Services
from spotguard.storage.snapshot import Inflight, SnapshotResult


@dataclass
class Delivery:
    at: datetime
    """Wall-clock time of arrival, comparable with the timeline's step times."""
    body: Any


@dataclass
class Receiver:
    """A webhook endpoint: records JSON bodies; answers from ``statuses`` first, then 200; may hang."""

    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    requests: int = 0
    url: str = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        raw = await read_body(receive)
        if self.hang:
            # Never answer; end quietly once the client gives up and closes the connection.
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.deliveries.append(Delivery(utcnow(), json.loads(raw)))
        await respond(send, status, b"ok" if status == 200 else b"nope")


@asynccontextmanager
async def receivers(*apps: Receiver) -> AsyncIterator[list[Receiver]]:
    """Serve each receiver on its own loopback port for the duration of the block."""
    async with anyio.create_task_group() as tg:
        for app in apps:
            bound = await tg.start(serve_tcp, app, "127.0.0.1", 0)
            app.url = f"{bound.url}/hooks/T000/SECRET-TOKEN"
        yield list(apps)
        tg.cancel_scope.cancel()


class FakeEngine:
    """An EngineAdapter as servers/base.py describes it: stop, then requests finish over time."""

    name = "fake-engine"

    def __init__(self, *, inflight: int = 0, finish_every: float = 0.1, stop_delay: float = 0.0,
                 fail_stop: bool = False, knows_inflight: bool = True) -> None:
        self._inflight = inflight
        self.finish_every = finish_every
        self.stop_delay = stop_delay
        self.fail_stop = fail_stop
        self.knows_inflight = knows_inflight
        self.stop_calls: list[tuple[float, bool]] = []
        self.stopped_at: float | None = None

    async def stop_accepting(self, *, dry_run: bool) -> str:
        self.stop_calls.append((anyio.current_time(), dry_run))
        if dry_run:
            return f"would stop taking work ({self._inflight} in flight)"
        await anyio.sleep(self.stop_delay)
        if self.fail_stop:
            raise EngineError("engine refused to stop: connection refused on 127.0.0.1:1")
        self.stopped_at = anyio.current_time()
        return "stopped taking new work"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        if dry_run:
            return "would take new work again"
        self.stopped_at = None
        return "takes new work again"

    async def inflight(self) -> int | None:
        if not self.knows_inflight:
            return None
        if self.stopped_at is None or self.finish_every <= 0:
            return self._inflight
        # Running requests finish one by one once the engine stops taking new ones.
        finished = int((anyio.current_time() - self.stopped_at) / self.finish_every)
        return max(0, self._inflight - finished)


class FakeBalancer:
    """A LoadBalancer as lb/base.py describes it, and no kinder than a real one: ``fail`` refuses every call
    (a LoadBalancerError naming the permission, as the providers raise), ``hang`` never answers (an API that
    accepts the connection and stalls), ``delay`` answers late. Dry runs answer at once, as the providers do."""

    def __init__(self, name: str = "fake-lb", *, delay: float = 0.0, hang: bool = False, fail: bool = False) -> None:
        self.name = name
        self.delay = delay
        self.hang = hang
        self.fail = fail
        self.deregistered: list[tuple[float, float, bool]] = []
        self.heartbeats = 0
        self.completed: list[bool] = []
        self.registered: list[bool] = []

    async def _answer(self, call: str) -> None:
        if self.hang:
            await anyio.sleep_forever()
        await anyio.sleep(self.delay)
        if self.fail:
            raise LoadBalancerError(f"{call}: AccessDenied; grant elasticloadbalancing:{call}")

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        self.deregistered.append((anyio.current_time(), budget, dry_run))
        if dry_run:
            return "would deregister i-123 from tg-1"
        await self._answer("DeregisterTargets")
        return "deregistered i-123 from tg-1"

    async def register(self, *, budget: float, dry_run: bool) -> str:
        self.registered.append(dry_run)
        if dry_run:
            return "would register i-123 in tg-1"
        await self._answer("RegisterTargets")
        return "registered i-123 in tg-1"

    async def heartbeat(self, *, dry_run: bool) -> None:
        self.heartbeats += 1
        if not dry_run:
            await self._answer("RecordLifecycleActionHeartbeat")

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        self.completed.append(dry_run)
        if not dry_run:
            await self._answer("CompleteLifecycleAction")
        return "no lifecycle hook configured"


class FakeSnapshotter:
    """The snapshot store as the step sees it (``storage.snapshot.Snapshotter.save``): records each call with the
    seconds it was given, stores every request handed to it; ``hang`` never returns (a stalled bucket);
    ``refuse`` fails the test (a dry run must never save)."""

    url = "s3://fake-bucket/spotguard"

    def __init__(self, *, hang: bool = False, refuse: bool = False) -> None:
        self.hang = hang
        self.refuse = refuse
        self.calls: list[tuple[Inflight, float]] = []
        """(what was handed over, seconds until the drain deadline at the call)."""
        self.started = anyio.Event()

    async def save(self, inflight: Inflight, *, notice: Notice, deadline: float, **_: object) -> SnapshotResult:
        if self.refuse:
            raise AssertionError("this drain must not save a snapshot")
        self.calls.append((inflight, (notice.deadline - utcnow()).total_seconds()))
        self.started.set()
        if self.hang:
            await anyio.sleep_forever()
        return SnapshotResult(where=f"{self.url}/i-0abc/{notice.event_id}/", requests=inflight.count, kv_slots=0,
                              stored_request_ids=frozenset(r.id for r in inflight.requests), missing=0)


def notice(*, seconds: float = 30.0, source: str = "aws", kind: str = "spot-interruption",
           event_id: str = "evt-1", payload: str = "") -> Notice:
    return Notice(source=source, kind=kind, event_id=event_id, deadline=window(seconds), detected_at=utcnow(),
                  payload=payload)


def config(*, urls: Sequence[str] = (), margin: float = 0.0, **drain: float) -> Config:
    base = Config()
    cfg = base.replace("drain", safety_margin=margin, **drain)
    if urls:
        cfg = cfg.replace("webhook", urls=list(urls), timeout=1.0)
    return cfg


def context(cfg: Config, the_notice: Notice, services: Services, http: httpx.AsyncClient, *,
            dry_run: bool = False, metrics: Metrics | None = None) -> DrainContext:
    return DrainContext(config=cfg, notice=the_notice, deadline=Deadline.for_notice(the_notice, cfg.drain.safety_margin), dry_run=dry_run,
                        metrics=metrics or Metrics(), log=structlog.get_logger("test"), http=http,
                        services=services)


def services(engine: FakeEngine, *balancers: FakeBalancer, journal: JournalAccess | None = None,
             **extra: Any) -> Services:
    return Services(identity=Identity(cloud="aws", instance_id="i-0abc"), engine=engine,
                    balancers=tuple(balancers), journal=journal, **extra)


def seconds_between(a: datetime | None, b: datetime | None) -> float:
    assert a is not None and b is not None
    return (b - a) / timedelta(seconds=1)
