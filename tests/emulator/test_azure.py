"""Azure IMDS as the emulator serves it: Scheduled Events with approval, instance metadata, token."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx
import pytest

from tests.support.emulator import RunningEmulator

EVENTS = "/metadata/scheduledevents"
VERSION = {"api-version": "2020-07-01"}
META = {"Metadata": "true"}


async def events(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get(EVENTS, params=VERSION, headers=META)
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


@pytest.mark.anyio
async def test_header_and_api_version_required(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        no_header = await client.get(EVENTS, params=VERSION)
        assert no_header.status_code == 400
        assert "metadata header" in no_header.json()["error"]
        assert (await client.get(EVENTS, headers=META)).status_code == 400
        assert (await client.get(EVENTS, params={"api-version": "latest"}, headers=META)).status_code == 400
        forwarded = await client.get(EVENTS, params=VERSION, headers={**META, "X-Forwarded-For": "1.2.3.4"})
        assert forwarded.status_code == 400
        assert await events(client) == {"DocumentIncarnation": 1, "Events": []}


@pytest.mark.anyio
async def test_event_fields_and_incarnation(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        before = datetime.now(UTC)
        event_id = await emulator.control.raise_notice("azure", "event", not_before_in_seconds=30)
        after = datetime.now(UTC)
        body = await events(client)
        assert body["DocumentIncarnation"] == 2
        [event] = body["Events"]
        assert event["EventId"] == event_id
        assert {k: event[k] for k in ("EventStatus", "EventType", "ResourceType", "Resources", "EventSource",
                                      "DurationInSeconds")} == {
            "EventStatus": "Scheduled", "EventType": "Preempt", "ResourceType": "VirtualMachine",
            "Resources": ["spotguard-vm"], "EventSource": "Platform", "DurationInSeconds": -1}
        assert event["Description"]
        assert event["NotBefore"].endswith(" GMT") and event["NotBefore"][3:5] == ", "
        not_before = parsedate_to_datetime(event["NotBefore"])  # whole seconds
        assert before + timedelta(seconds=29) <= not_before <= after + timedelta(seconds=30)
        await emulator.control.change("azure", event_id, status="Started")
        body = await events(client)
        assert body["DocumentIncarnation"] == 3
        assert body["Events"][0]["EventStatus"] == "Started"
        assert body["Events"][0]["NotBefore"] == ""
        await emulator.control.withdraw("azure", event_id)
        assert await events(client) == {"DocumentIncarnation": 4, "Events": []}


@pytest.mark.anyio
async def test_custom_event(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        event_id = await emulator.control.raise_notice(
            "azure", "event", event_id="C7061BAC-AFDC-4513-B24B-AA5F13A16123", event_type="Reboot",
            resources=["other-vm"], duration=5, source="User", description="user reboot")
        [event] = (await events(client))["Events"]
        assert event_id == event["EventId"] == "C7061BAC-AFDC-4513-B24B-AA5F13A16123"
        assert (event["EventType"], event["Resources"], event["DurationInSeconds"], event["EventSource"],
                event["Description"]) == ("Reboot", ["other-vm"], 5, "User", "user reboot")


@pytest.mark.anyio
async def test_start_requests_approve_and_are_logged(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        event_id = await emulator.control.raise_notice("azure", "event")
        body = json.dumps({"StartRequests": [{"EventId": event_id}]})
        approved = await client.post(EVENTS, params=VERSION, headers=META, content=body)
        assert approved.status_code == 200
        after = await events(client)
        assert after["DocumentIncarnation"] == 3
        assert after["Events"][0]["EventStatus"] == "Started"
        assert after["Events"][0]["NotBefore"] == ""
        posts = [r for r in await emulator.control.requests(EVENTS) if r["method"] == "POST"]
        assert len(posts) == 1
        assert json.loads(posts[0]["body"]) == {"StartRequests": [{"EventId": event_id}]}
        assert posts[0]["headers"]["metadata"] == "true" and posts[0]["params"] == VERSION
        assert (await emulator.control.notices())["azure"]["approvals"] == [event_id]
        garbage = await client.post(EVENTS, params=VERSION, headers=META, content=b"{not json")
        assert garbage.status_code == 400


@pytest.mark.anyio
async def test_instance_metadata(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        name = await client.get("/metadata/instance/compute/name",
                                params={"api-version": "2021-02-01", "format": "text"}, headers=META)
        assert (name.status_code, name.text) == (200, "spotguard-vm")
        assert (await client.get("/metadata/instance/compute/name", params={"format": "text"},
                                 headers=META)).status_code == 400
        doc = (await client.get("/metadata/instance", params={"api-version": "2021-02-01"}, headers=META)).json()
        i = emulator.instance
        assert {k: doc["compute"][k] for k in ("name", "vmId", "subscriptionId", "resourceGroupName", "location")} \
            == {"name": i.vm_name, "vmId": i.vm_id, "subscriptionId": i.subscription_id,
                "resourceGroupName": i.resource_group, "location": i.location}
        assert doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"] == i.azure_ip
        priority = await client.get("/metadata/instance/compute/priority",
                                    params={"api-version": "2021-02-01", "format": "text"}, headers=META)
        assert priority.text == "Spot"
        missing = await client.get("/metadata/instance/compute/nope", params=VERSION, headers=META)
        assert missing.status_code == 404


@pytest.mark.anyio
async def test_managed_identity_token(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        answer = await client.get("/metadata/identity/oauth2/token", headers=META, params={
            "api-version": "2018-02-01", "resource": "https://management.azure.com/"})
        body = answer.json()
        assert body["token_type"] == "Bearer" and body["access_token"]
        assert body["resource"] == "https://management.azure.com/" and int(body["expires_in"]) > 0
        no_resource = await client.get("/metadata/identity/oauth2/token", headers=META,
                                       params={"api-version": "2018-02-01"})
        assert no_resource.status_code == 400
