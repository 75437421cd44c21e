"""GCP sources against the emulator's metadata server: hanging GETs, both values, fallback, identity."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import anyio
import httpx
import pytest

from spotguard.asgi import Bound, Receive, Scope, Send, read_body, respond, serve_tcp
from spotguard.clouds import gcp
from spotguard.errors import MalformedMetadata, MetadataUnavailable
from spotguard.notice import Notice
from tests.clouds.helpers import config_for
from tests.support.emulator import RunningEmulator

pytestmark = pytest.mark.anyio


def watches(emulator: RunningEmulator, http: httpx.AsyncClient, *, hanging_timeout: int = 5,
            window: float = 30.0) -> dict[str, gcp.GcpWatch]:
    config = config_for(emulator.url, request_timeout=0.5,
                        gcp={"hanging_timeout": hanging_timeout, "window": window})
    return {watch.name: watch for watch in gcp.build_sources(config, http)}


async def test_preemption_arrives_through_the_hanging_get(emulator: RunningEmulator,
                                                          http: httpx.AsyncClient) -> None:
    preempted = watches(emulator, http, window=25)["gcp-preempted"]
    assert preempted.hanging is True
    got: list[Sequence[Notice]] = []

    async def wait() -> None:
        got.append(await preempted.poll())

    # The watch returns because the value changed, not at its 5 s hanging timeout; how fast is
    # bench/detect.py's figure (target ~100 ms), not this test's.
    with anyio.fail_after(10):  # hang guard
        assert await preempted.poll() == []  # last_etag=0: answers at once with FALSE and its ETag
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            while not [r for r in await emulator.control.requests(gcp.PREEMPTED_PATH)
                       if r["params"].get("last_etag", "0") != "0"]:
                await anyio.sleep(0.01)  # until the hanging GET is parked on the server
            assert got == []  # parked: no answer while nothing changes
            await emulator.control.raise_notice("gcp", "preempted")
    [[notice]] = got
    assert (notice.source, notice.kind, notice.action) == ("gcp", "preemption", "drain")
    assert notice.deadline == notice.detected_at + timedelta(seconds=25)
    [first, hanging] = await emulator.control.requests(gcp.PREEMPTED_PATH)
    assert first["params"] == {"wait_for_change": "true", "last_etag": "0", "timeout_sec": "5"}
    assert hanging["headers"]["metadata-flavor"] == "Google"


async def test_value_unchanged_keeps_the_event_and_false_withdraws(emulator: RunningEmulator,
                                                                  http: httpx.AsyncClient) -> None:
    preempted = watches(emulator, http, hanging_timeout=1)["gcp-preempted"]
    with anyio.fail_after(10):
        event_id = await emulator.control.raise_notice("gcp", "preempted")
        [notice] = await preempted.poll()
        assert await preempted.poll() == [notice]  # the hanging GET timed out on the server: same value
        await emulator.control.change("gcp", event_id, value="FALSE")
        assert await preempted.poll() == []
        await emulator.control.change("gcp", event_id, value="TRUE")
        [again] = await preempted.poll()
    assert again.event_id != notice.event_id  # a second episode is a new event


async def test_maintenance_event_terminate_drains_migrate_observes(emulator: RunningEmulator,
                                                                   http: httpx.AsyncClient) -> None:
    maintenance = watches(emulator, http)["gcp-maintenance"]
    with anyio.fail_after(10):
        assert await maintenance.poll() == []
        event_id = await emulator.control.raise_notice("gcp", "maintenance", value="MIGRATE_ON_HOST_MAINTENANCE")
        [migrate] = await maintenance.poll()
        await emulator.control.change("gcp", event_id, value="TERMINATE_ON_HOST_MAINTENANCE")
        [terminate] = await maintenance.poll()
        await emulator.control.withdraw("gcp", event_id)
        assert await maintenance.poll() == []
    assert (migrate.kind, migrate.action, terminate.action) == ("maintenance-event", "observe", "drain")


async def test_gpu_maintenance_drains_a_lead_before_the_window_not_at_once(emulator: RunningEmulator,
                                                                          http: httpx.AsyncClient) -> None:
    # The emulated VM has a GPU: TERMINATE_ON_HOST_MAINTENANCE comes an hour before the window starts.
    config = config_for(emulator.url, gcp={"maintenance_lead": 300})
    maintenance = gcp.build_sources(config, http)[1]
    with anyio.fail_after(10):
        await emulator.control.raise_notice("gcp", "maintenance")
        [notice] = await maintenance.poll()
        upcoming = (await emulator.control.notices())["gcp"]["upcoming-maintenance"]
    window = datetime.fromisoformat(upcoming["window_start_time"].replace("Z", "+00:00"))
    assert notice.action == "drain" and notice.deadline == window
    assert notice.act_at == window - timedelta(seconds=300)
    assert not notice.due()  # the node keeps serving until the lead
    assert timedelta(minutes=50) < notice.deadline - notice.detected_at <= timedelta(hours=1)
    log = await emulator.control.requests(gcp.UPCOMING_PATH)
    assert [entry["params"] for entry in log] == [{"alt": "json"}]


async def test_a_window_inside_the_lead_drains_at_once_with_its_deadline(emulator: RunningEmulator,
                                                                         http: httpx.AsyncClient) -> None:
    maintenance = gcp.build_sources(config_for(emulator.url, gcp={"maintenance_lead": 300}), http)[1]
    with anyio.fail_after(10):
        await emulator.control.raise_notice("gcp", "maintenance", window_start_in_seconds=120)
        [notice] = await maintenance.poll()
    assert notice.act_at is None and notice.due()
    assert timedelta(seconds=100) < notice.deadline - notice.detected_at <= timedelta(seconds=121)


async def test_without_a_readable_window_the_drain_starts_at_once(emulator: RunningEmulator,
                                                                  http: httpx.AsyncClient) -> None:
    maintenance = gcp.build_sources(config_for(emulator.url), http)[1]
    with anyio.fail_after(10):
        await emulator.control.fault(gcp.UPCOMING_PATH, status=503, count=1)
        await emulator.control.raise_notice("gcp", "maintenance")
        [notice] = await maintenance.poll()
    # Early is safe, late is not: the documented minimum notice, acting now.
    assert notice.act_at is None
    assert notice.deadline == notice.detected_at + timedelta(seconds=gcp.MAINTENANCE_WINDOW)


async def test_the_two_watches_do_not_wait_on_each_other(emulator: RunningEmulator,
                                                         http: httpx.AsyncClient) -> None:
    both = watches(emulator, http, hanging_timeout=30)
    with anyio.fail_after(5):  # far below the 30 s hanging timeout
        for watch in both.values():
            assert await watch.poll() == []
        async with anyio.create_task_group() as tg:
            tg.start_soon(both["gcp-maintenance"].poll)  # parks for up to 30 s
            await emulator.control.raise_notice("gcp", "preempted")
            assert len(await both["gcp-preempted"].poll()) == 1
            tg.cancel_scope.cancel()


async def test_hanging_failures_fall_back_to_plain_gets_then_retry(emulator: RunningEmulator,
                                                                   http: httpx.AsyncClient) -> None:
    config = config_for(emulator.url, request_timeout=0.5, gcp={"hanging_timeout": 5})
    preempted = gcp.GcpWatch("gcp-preempted", config, http, gcp.PREEMPTED_PATH,
                             lambda text, etag, seen: gcp.parse_preempted(text, etag, seen, window=30),
                             hang_again_after=0.3)
    with anyio.fail_after(10):
        await emulator.control.fault(gcp.PREEMPTED_PATH, status=503, count=gcp.FALLBACK_AFTER_FAILURES)
        for _ in range(gcp.FALLBACK_AFTER_FAILURES):
            assert preempted.hanging
            with pytest.raises(MetadataUnavailable):
                await preempted.poll()
        assert preempted.hanging is False  # the runner now paces it like a polled source
        event_id = await emulator.control.raise_notice("gcp", "preempted")
        assert len(await preempted.poll()) == 1
        log = await emulator.control.requests(gcp.PREEMPTED_PATH)
        assert "wait_for_change" not in log[-1]["params"]
        seen: list[Sequence[Notice]] = []

        async def runner() -> None:
            while True:
                seen.append(await preempted.poll())
                await anyio.sleep(0.05)  # the runner's poll interval while the source is not hanging

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            while not [r for r in (await emulator.control.requests(gcp.PREEMPTED_PATH))[len(log):]
                       if r["params"].get("wait_for_change") == "true"]:
                await anyio.sleep(0.02)  # until a hanging GET is parked again
            assert preempted.hanging is True
            await emulator.control.withdraw("gcp", event_id)
            while not seen or seen[-1]:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


async def test_an_answer_without_metadata_flavor_is_not_a_notice(emulator: RunningEmulator,
                                                                 http: httpx.AsyncClient) -> None:
    preempted = watches(emulator, http)["gcp-preempted"]
    with anyio.fail_after(10):
        await emulator.control.fault(gcp.PREEMPTED_PATH, status=200, body="TRUE", count=1)
        with pytest.raises(MalformedMetadata) as caught:
            await preempted.poll()
    assert caught.value.reason == "not_google"


async def test_identity(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        me = await gcp.identity(config_for(emulator.url), http)
    i = emulator.instance
    assert (me.cloud, me.instance_id, me.private_ip, me.zone, me.region, me.vm_name) == (
        "gcp", i.gcp_instance_id, i.gcp_ip, i.gcp_zone, "us-central1", i.gcp_name)


async def _never_hangs(scope: Scope, receive: Receive, send: Send) -> None:
    """A proxy in front of the metadata server that ignores wait_for_change."""
    await read_body(receive)
    await respond(send, 200, "FALSE", headers=[(b"metadata-flavor", b"Google"), (b"etag", b"same")])


async def test_a_server_that_does_not_hang_is_not_asked_in_a_tight_loop(http: httpx.AsyncClient) -> None:
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            bound: Bound = await tg.start(serve_tcp, _never_hangs, "127.0.0.1", 0)
            [preempted, _] = gcp.build_sources(config_for(bound.url, gcp={"hanging_timeout": 30}), http)
            polls = 0
            while preempted.hanging:
                assert await preempted.poll() == []
                polls += 1
        tg.cancel_scope.cancel()
    assert polls == 1 + gcp.FALLBACK_AFTER_FAILURES  # etag 0 once, then three answers that did not wait
