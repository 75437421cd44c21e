"""Shared pieces of the storage tests: a drain context, a filled journal, S3 buckets, a stalling proxy."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import anyio
import boto3
import httpx
import pytest
import structlog

from spotguard import asgi
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.deadline import Deadline
from spotguard.drain import snapshot as snapshot_step
from spotguard.drain.step import DrainContext
from spotguard.gate.journal import EntryJournal, JournalAccess
from spotguard.gate.protocol import JournalEntry
from spotguard.metrics import Metrics
from spotguard.notice import Notice, utcnow
from spotguard.servers.none import NoEngine
from spotguard.services import Services
from spotguard.storage.snapshot import Snapshotter, prepare


def make_ctx(config: Config, http: httpx.AsyncClient, journal: JournalAccess | None, *, event_id: str = "evt-1",
             seconds: float = 60.0, metrics: Metrics | None = None) -> DrainContext:
    now = utcnow()
    notice = Notice(source="manual", kind="test", event_id=event_id, deadline=now + timedelta(seconds=seconds),
                    detected_at=now)
    return DrainContext(config=config, notice=notice, deadline=Deadline.for_notice(notice, 0.0), dry_run=False,
                        metrics=metrics or Metrics(), log=structlog.get_logger("test"), http=http,
                        services=Services(identity=Identity(cloud="test", instance_id="i-test"), engine=NoEngine(),
                                          journal=journal))


async def take_snapshot(ctx: DrainContext, snapshotter: Snapshotter | None = None) -> str:
    """The snapshot step's work, on ``snapshotter`` or on a store opened for this one call (no model digest)."""
    if snapshotter is None:
        snapshotter = await prepare(ctx.config.replace("snapshot", model_path=""))
    return await snapshot_step.take_snapshot(ctx, snapshotter)


def fill_journal(count: int, *, body_size: int = 600) -> EntryJournal:
    journal = EntryJournal()
    for n in range(count):
        body = json.dumps({"model": "m", "stream": True, "messages": [
            {"role": "user", "content": f"question {n} " + "x" * body_size}]}).encode()
        journal.add(JournalEntry(id=f"req-{n + 1:08d}", endpoint="/v1/chat/completions", model="m", body=body,
                                 stream=True, output=f"answer {n} so far"))
    return journal


@pytest.fixture
def bucket(moto_url: str) -> str:
    """A fresh bucket on the session's moto server."""
    name = f"snap-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


StallWhen = Callable[[str], bool]


@pytest.fixture
async def stalling_proxy(moto_url: str) -> AsyncIterator[Callable[[StallWhen], str]]:
    """Start loopback proxies to moto that hang forever on requests whose path matches a predicate."""
    release = anyio.Event()
    async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=10) as upstream:

        async def start(stall: StallWhen) -> str:
            async def app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
                if scope["type"] != "http":
                    return
                body = await asgi.read_body(receive, limit=64 << 20)
                target = scope["raw_path"].decode()
                if stall(target):
                    await release.wait()  # until the test ends: a store that never answers
                    await asgi.respond(send, 503, b"")
                    return
                query = scope.get("query_string", b"").decode()
                headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
                response = await upstream.request(scope["method"], f"{moto_url}{target}"
                                                  + (f"?{query}" if query else ""), content=body, headers=headers)
                await asgi.respond(send, response.status_code, response.content,
                                   content_type=response.headers.get("content-type", "application/xml"),
                                   headers=[(b"etag", response.headers["etag"].encode())]
                                   if "etag" in response.headers else None)

            bound = await tg.start(asgi.serve_tcp, app, "127.0.0.1", 0)
            return bound.url

        yield start
        release.set()
        tg.cancel_scope.cancel()
