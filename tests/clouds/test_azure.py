"""Azure Scheduled Events against the emulator's IMDS: kinds, this VM only, withdrawal, approval."""

from __future__ import annotations

import json
from datetime import timedelta
from email.utils import parsedate_to_datetime

import anyio
import httpx
import pytest

from spotguard.clouds import azure
from spotguard.errors import MetadataUnavailable
from tests.clouds.helpers import config_for
from tests.support.emulator import RunningEmulator

pytestmark = pytest.mark.anyio


def source(emulator: RunningEmulator, http: httpx.AsyncClient, *, request_timeout: float = 1.0,
           **azure_config: object) -> azure.AzureSource:
    [only] = azure.build_sources(config_for(emulator.url, request_timeout=request_timeout,
                                            azure=dict(azure_config)), http)
    return only


@pytest.mark.parametrize(("event_type", "action"), [
    ("Preempt", "drain"), ("Terminate", "drain"), ("Reboot", "observe"), ("Redeploy", "observe"),
    ("Freeze", "observe")])
async def test_each_event_type(emulator: RunningEmulator, http: httpx.AsyncClient, event_type: str,
                               action: str) -> None:
    events = source(emulator, http)
    with anyio.fail_after(10):
        assert await events.poll() == []
        event_id = await emulator.control.raise_notice("azure", "event", event_type=event_type,
                                                       not_before_in_seconds=600)
        [notice] = await events.poll()
        [raw] = (await emulator.control.notices())["azure"]["Events"]
    assert (notice.source, notice.kind, notice.event_id, notice.action) == (
        "azure", event_type.lower(), event_id, action)
    assert notice.deadline == parsedate_to_datetime(raw["NotBefore"])
    assert json.loads(notice.payload) == raw


async def test_drain_types_are_configurable(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    # Matched case-insensitively: the kind is shown lower-cased, and that spelling works too.
    events = source(emulator, http, drain_event_types=["preempt", "REBOOT"])
    with anyio.fail_after(10):
        await emulator.control.raise_notice("azure", "event", event_type="Reboot")
        [notice] = await events.poll()
    assert (notice.kind, notice.action) == ("reboot", "drain")


async def test_only_events_naming_this_vm(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    events = source(emulator, http)
    with anyio.fail_after(10):
        await emulator.control.raise_notice("azure", "event", resources=["other-vm"])
        assert await events.poll() == []
        mine = await emulator.control.raise_notice("azure", "event", resources=["other-vm", "SPOTGUARD-VM"])
        assert [n.event_id for n in await events.poll()] == [mine]
        await events.poll()
        name_requests = await emulator.control.requests(azure.NAME_PATH)
    assert len(name_requests) == 1  # asked once, then cached
    assert name_requests[0]["params"] == {"api-version": "2021-02-01", "format": "text"}
    assert name_requests[0]["headers"]["metadata"] == "true"


async def test_configured_vm_name_is_not_asked(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    events = source(emulator, http, vm_name="renamed")
    with anyio.fail_after(10):
        await emulator.control.raise_notice("azure", "event", resources=["renamed"])
        assert len(await events.poll()) == 1
        assert await emulator.control.requests(azure.NAME_PATH) == []


async def test_started_uses_the_default_window_and_gone_is_withdrawn(emulator: RunningEmulator,
                                                                     http: httpx.AsyncClient) -> None:
    events = source(emulator, http, default_window=40)
    with anyio.fail_after(10):
        event_id = await emulator.control.raise_notice("azure", "event", event_type="Preempt",
                                                       not_before_in_seconds=30)
        [scheduled] = await events.poll()
        first_incarnation = events.incarnation
        await emulator.control.change("azure", event_id, status="Started")
        [started] = await events.poll()
        assert started.deadline == scheduled.detected_at + timedelta(seconds=40)
        assert await events.poll() == [started]
        assert events.incarnation is not None and first_incarnation is not None
        assert events.incarnation > first_incarnation
        await emulator.control.withdraw("azure", event_id)
        assert await events.poll() == []
        sent = (await emulator.control.requests(azure.EVENTS_PATH))[0]
    assert sent["params"] == {"api-version": "2020-07-01"} and sent["headers"]["metadata"] == "true"


async def test_approve_posts_start_requests(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    config = config_for(emulator.url)
    with anyio.fail_after(10):
        event_id = await emulator.control.raise_notice("azure", "event")
        detail = await azure.approve(config, http, event_id)
        state = (await emulator.control.notices())["azure"]
        [post] = [r for r in await emulator.control.requests(azure.EVENTS_PATH) if r["method"] == "POST"]
    assert event_id in detail
    assert state["approvals"] == [event_id] and state["Events"][0]["EventStatus"] == "Started"
    assert json.loads(post["body"]) == {"StartRequests": [{"EventId": event_id}]}


async def test_approve_failure_is_an_error(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        await emulator.control.fault(azure.EVENTS_PATH, status=500)
        with pytest.raises(MetadataUnavailable) as caught:
            await azure.approve(config_for(emulator.url), http, "x")
    assert caught.value.reason == "status_500"


async def test_first_call_may_take_long_later_calls_may_not(emulator: RunningEmulator,
                                                            http: httpx.AsyncClient) -> None:
    events = source(emulator, http, request_timeout=0.3)
    with anyio.fail_after(10):
        await emulator.control.fault(azure.EVENTS_PATH, latency=1.0, count=1)
        assert await events.poll() == []  # the service switching itself on is not a failure
        await emulator.control.fault(azure.EVENTS_PATH, latency=1.0, count=1)
        with pytest.raises(MetadataUnavailable) as caught:
            await events.poll()
    assert caught.value.reason == "timeout"


async def test_identity(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        me = await azure.identity(config_for(emulator.url), http)
    i = emulator.instance
    assert (me.cloud, me.instance_id, me.private_ip, me.region, me.zone, me.vm_name) == (
        "azure", i.vm_id, i.azure_ip, i.location, "1", i.vm_name)
