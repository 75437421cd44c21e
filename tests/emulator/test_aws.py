"""AWS IMDSv2 as the emulator serves it: tokens, notices on their real paths, identity."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

from tests.support.emulator import RunningEmulator

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
META = "/latest/meta-data"
AWS_DATE = re.compile(r"^\d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")


async def token(client: httpx.AsyncClient, ttl: int = 60) -> str:
    answer = await client.put("/latest/api/token", headers={TTL: str(ttl)})
    assert answer.status_code == 200
    assert answer.headers[TTL.lower()] == str(ttl)
    return answer.text


async def get(client: httpx.AsyncClient, path: str, tok: str) -> httpx.Response:
    return await client.get(META + path, headers={TOKEN: tok})


def parse_aws_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@pytest.mark.anyio
@pytest.mark.parametrize("ttl", ["0", "21601", "abc", "-5", ""])
async def test_token_put_with_bad_ttl_is_400(client: httpx.AsyncClient, ttl: str) -> None:
    with anyio.fail_after(5):
        answer = await client.put("/latest/api/token", headers={TTL: ttl})
    assert answer.status_code == 400


@pytest.mark.anyio
async def test_token_rules(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        assert (await client.put("/latest/api/token")).status_code == 400  # no TTL header at all
        assert (await client.get("/latest/api/token", headers={TTL: "60"})).status_code == 405
        forwarded = await client.put("/latest/api/token", headers={TTL: "60", "X-Forwarded-For": "10.0.0.9"})
        assert forwarded.status_code == 403
        no_token = await client.get(META + "/instance-id")
        assert no_token.status_code == 401
        assert no_token.headers["content-type"].startswith("text/html")
        assert (await get(client, "/instance-id", "not-a-token")).status_code == 401
        tok = await token(client, 21600)
        assert (await get(client, "/instance-id", tok)).text == "i-0123456789abcdef0"


@pytest.mark.anyio
async def test_token_expires_in_real_time(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        tok = await token(client, ttl=1)
        assert (await get(client, "/instance-id", tok)).status_code == 200
        while (await get(client, "/instance-id", tok)).status_code == 200:
            await anyio.sleep(0.05)  # polling interval; the bound is fail_after above
        assert (await get(client, "/instance-id", tok)).status_code == 401
        assert (await get(client, "/instance-id", await token(client))).status_code == 200


@pytest.mark.anyio
async def test_imdsv1_allowed_when_v2_not_required(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        await emulator.control.configure(require_v2=False)
        assert (await client.get(META + "/instance-id")).text == "i-0123456789abcdef0"
        # an invalid token is refused even where v1 is allowed, as IMDS does
        assert (await get(client, "/instance-id", "stale")).status_code == 401


@pytest.mark.anyio
async def test_identity_paths(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        tok = await token(client)
        expected = {
            "/instance-id": "i-0123456789abcdef0", "/local-ipv4": "10.0.0.12", "/placement/region": "us-east-1",
            "/placement/availability-zone": "us-east-1a", "/mac": emulator.instance.mac,
        }
        for path, value in expected.items():
            answer = await get(client, path, tok)
            assert (answer.status_code, answer.text) == (200, value), path
            assert answer.headers["content-type"] == "text/plain"
        listing = (await get(client, "/", tok)).text.splitlines()
        assert {"instance-id", "spot/", "events/", "placement/"} <= set(listing)
        doc = await client.get("/latest/dynamic/instance-identity/document", headers={TOKEN: tok})
        assert json.loads(doc.text)["region"] == "us-east-1"
        assert (await get(client, "/no-such-thing", tok)).status_code == 404


@pytest.mark.anyio
async def test_spot_notice_appears_and_withdraws(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        tok = await token(client)
        none = await get(client, "/spot/instance-action", tok)
        assert none.status_code == 404
        assert none.headers["content-type"] == "text/html"
        assert "<title>404 - Not Found</title>" in none.text
        before = datetime.now(UTC)
        event_id = await emulator.control.raise_notice("aws", "spot", action="terminate", in_seconds=120)
        body = (await get(client, "/spot/instance-action", tok)).json()
        assert body["action"] == "terminate"
        when = parse_aws_time(body["time"])
        assert before + timedelta(seconds=118) <= when <= datetime.now(UTC) + timedelta(seconds=121)
        assert (await get(client, "/spot/termination-time", tok)).text == body["time"]
        await emulator.control.change("aws", event_id, action="stop", time="2030-01-02T03:04:05Z")
        assert (await get(client, "/spot/instance-action", tok)).json() == {
            "action": "stop", "time": "2030-01-02T03:04:05Z"}
        await emulator.control.withdraw("aws", event_id)
        assert (await get(client, "/spot/instance-action", tok)).status_code == 404


@pytest.mark.anyio
async def test_rebalance_recommendation(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        tok = await token(client)
        assert (await get(client, "/events/recommendations/rebalance", tok)).status_code == 404
        before = datetime.now(UTC)
        event_id = await emulator.control.raise_notice("aws", "rebalance")
        notice = (await get(client, "/events/recommendations/rebalance", tok)).json()
        # Bracketed by the clock before and after, not a tolerance: the document's time has whole seconds.
        assert before - timedelta(seconds=1) <= parse_aws_time(notice["noticeTime"]) <= datetime.now(UTC)
        await emulator.control.withdraw("aws", event_id)
        assert (await get(client, "/events/recommendations/rebalance", tok)).status_code == 404


@pytest.mark.anyio
async def test_scheduled_events(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        tok = await token(client)
        assert (await get(client, "/events/maintenance/scheduled", tok)).json() == []
        before = datetime.now(UTC)
        event_id = await emulator.control.raise_notice(
            "aws", "scheduled", code="system-reboot", not_before_in_seconds=600, not_after_in_seconds=4200,
            description="scheduled reboot")
        after = datetime.now(UTC)
        named = await emulator.control.raise_notice("aws", "scheduled", event_id="instance-event-0d59937288b749b32",
                                                    not_after_in_seconds=None)
        events = (await get(client, "/events/maintenance/scheduled", tok)).json()
        assert [e["EventId"] for e in events] == [event_id, named]
        first = events[0]
        assert set(first) == {"Code", "Description", "EventId", "NotBefore", "NotAfter", "State"}
        assert (first["Code"], first["State"], first["Description"]) == ("system-reboot", "active", "scheduled reboot")
        assert AWS_DATE.match(first["NotBefore"]) and AWS_DATE.match(first["NotAfter"])
        not_before = datetime.strptime(first["NotBefore"], "%d %b %Y %H:%M:%S GMT").replace(tzinfo=UTC)
        assert before + timedelta(seconds=599) <= not_before <= after + timedelta(seconds=600)  # whole seconds
        assert events[1]["NotAfter"] == "" and events[1]["Code"] == "system-maintenance"
        await emulator.control.change("aws", event_id, state="canceled")
        events = (await get(client, "/events/maintenance/scheduled", tok)).json()
        assert events[0]["State"] == "canceled"
        await emulator.control.withdraw("aws", event_id)
        assert [e["EventId"] for e in (await get(client, "/events/maintenance/scheduled", tok)).json()] == [named]


@pytest.mark.anyio
async def test_lifecycle_state(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        tok = await token(client)
        path = "/autoscaling/target-lifecycle-state"
        assert (await get(client, path, tok)).status_code == 404  # brand-new instance
        event_id = await emulator.control.raise_notice("aws", "lifecycle", state="Terminated")
        assert (await get(client, path, tok)).text == "Terminated"
        await emulator.control.withdraw("aws", event_id)
        assert (await get(client, path, tok)).text == "InService"
