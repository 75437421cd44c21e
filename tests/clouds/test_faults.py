"""Each injected fault, on each cloud's notice endpoint, gives the right error type and reason label;
garbage never becomes a notice, and the source works again once the fault is gone."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from spotguard.asgi import Bound, Receive, Scope, Send, read_body, respond, serve_tcp
from spotguard.clouds import aws, azure, gcp
from spotguard.errors import MalformedMetadata, MetadataError, MetadataUnavailable
from spotguard.notice import NoticeSource
from tests.clouds.helpers import config_for
from tests.support.emulator import RunningEmulator

pytestmark = pytest.mark.anyio

CLOUDS = {"aws": aws.SPOT_PATH, "gcp": gcp.PREEMPTED_PATH, "azure": azure.EVENTS_PATH}

FAULTS: list[tuple[str, dict[str, Any], type[MetadataError], str]] = [
    ("latency", {"latency": 3.0}, MetadataUnavailable, "timeout"),
    ("429", {"status": 429}, MetadataUnavailable, "throttled"),
    ("503", {"status": 503}, MetadataUnavailable, "status_503"),
    ("500", {"status": 500}, MetadataUnavailable, "status_500"),
    ("403", {"status": 403}, MetadataUnavailable, "status_403"),
    ("drop", {"drop": True}, MetadataUnavailable, "connection"),
    ("huge", {"status": 200, "body": "{" + "x" * 300_000}, MalformedMetadata, "too_large"),
    ("html", {"status": 200, "body": "<html><body>TRUE</body></html>", "content_type": "text/html"},
     MalformedMetadata, "malformed-body"),
]
MALFORMED_REASON = {"aws": "bad_json", "gcp": "not_google", "azure": "bad_json"}


def notice_source(cloud: str, emulator: RunningEmulator, http: httpx.AsyncClient) -> NoticeSource:
    # hanging_timeout 1 s: a latency fault of 3 s outlasts the hanging GET's own limit (1 s + 0.3 s)
    config = config_for(emulator.url, request_timeout=0.3, gcp={"hanging_timeout": 1})
    module = {"aws": aws, "gcp": gcp, "azure": azure}[cloud]
    sources: list[NoticeSource] = list(module.build_sources(config, http))
    return sources[0]


@pytest.mark.parametrize("cloud", CLOUDS)
@pytest.mark.parametrize(("fault", "params", "error", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_fault(emulator: RunningEmulator, http: httpx.AsyncClient, cloud: str, fault: str,
                     params: dict[str, Any], error: type[MetadataError], reason: str) -> None:
    source = notice_source(cloud, emulator, http)
    with anyio.fail_after(15):
        assert await source.poll() == []  # warm: token fetched, GCP ETag known, Azure's first call done
        await emulator.control.fault(CLOUDS[cloud], **params)
        with pytest.raises(error) as caught:
            await source.poll()
        assert caught.value.reason == (MALFORMED_REASON[cloud] if reason == "malformed-body" else reason)
        await emulator.control.clear_faults()
        await emulator.control.raise_notice(cloud, {"aws": "spot", "gcp": "preempted", "azure": "event"}[cloud])
        assert len(await source.poll()) == 1  # recovered: nothing about the fault stuck


async def _not_text(scope: Scope, receive: Receive, send: Send) -> None:
    """A metadata server gone wrong: every answer is 200 with bytes that are not UTF-8."""
    await read_body(receive)
    await respond(send, 200, b"\xff\xfe\x00TRUE\x80", content_type="text/plain",
                  headers=[(b"metadata-flavor", b"Google"), (b"etag", b"abc")])


@pytest.mark.parametrize("cloud", CLOUDS)
async def test_bytes_that_are_not_text(http: httpx.AsyncClient, cloud: str) -> None:
    module = {"aws": aws, "gcp": gcp, "azure": azure}[cloud]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            bound: Bound = await tg.start(serve_tcp, _not_text, "127.0.0.1", 0)
            config = config_for(bound.url, azure={"vm_name": "vm"})
            with pytest.raises(MalformedMetadata) as caught:
                await module.build_sources(config, http)[0].poll()
        tg.cancel_scope.cancel()
    assert caught.value.reason == "not_text"
