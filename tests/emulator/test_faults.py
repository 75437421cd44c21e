"""Fault injection: status, latency, dropped connections, expired tokens; order, count and duration."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.errors import ControlError
from tests.support.emulator import RunningEmulator

FLAVOR = {"Metadata-Flavor": "Google"}
PREEMPTED = "/computeMetadata/v1/instance/preempted"
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "300"}


@pytest.mark.anyio
async def test_status_fault_consumed_in_order(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        first = await emulator.control.fault("/computeMetadata/", status=503, body="maintenance", count=2)
        await emulator.control.fault(PREEMPTED, status=429, count=1)
        statuses = [(await client.get(PREEMPTED, headers=FLAVOR)).status_code for _ in range(4)]
        assert statuses == [503, 503, 429, 200]
        log = await emulator.control.requests(PREEMPTED)
        assert [e["fault_id"] for e in log][:2] == [first, first]
        assert [e["status"] for e in log] == statuses


@pytest.mark.anyio
async def test_fault_body_and_content_type(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        await emulator.control.fault("/latest/", status=200, body="<html>garbage", content_type="text/html", count=1)
        answer = await client.get("/latest/meta-data/spot/instance-action")
        assert (answer.text, answer.headers["content-type"]) == ("<html>garbage", "text/html")


@pytest.mark.anyio
async def test_fault_only_matches_its_prefix(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        await emulator.control.fault("/metadata/", status=500)
        assert (await client.get(PREEMPTED, headers=FLAVOR)).status_code == 200
        assert (await client.get("/metadata/scheduledevents", params={"api-version": "2020-07-01"},
                                 headers={"Metadata": "true"})).status_code == 500
        assert (await emulator.control.notices())["gcp"]["preempted"]["value"] == "FALSE"  # control API untouched
        await emulator.control.clear_faults()
        assert (await client.get("/metadata/scheduledevents", params={"api-version": "2020-07-01"},
                                 headers={"Metadata": "true"})).status_code == 200


@pytest.mark.anyio
async def test_latency_fault(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    # Order, not a stopwatch: a request sent while the delayed one is held is answered first (the fault
    # was for one request only), and the delayed one still gets the real answer.
    slow: list[httpx.Response] = []
    with anyio.fail_after(10):  # hang guard
        await emulator.control.fault(PREEMPTED, latency=2.0, count=1)

        async def delayed() -> None:
            slow.append(await client.get(PREEMPTED, headers=FLAVOR))

        async with anyio.create_task_group() as tg:
            tg.start_soon(delayed)
            while not await emulator.control.requests(PREEMPTED):
                await anyio.sleep(0.01)  # until the delayed request has reached the server
            fast = await client.get(PREEMPTED, headers=FLAVOR)
            assert fast.text == "FALSE" and slow == []  # answered while the first one is still held
    assert [r.text for r in slow] == ["FALSE"]  # latency alone delays the real answer
    with anyio.fail_after(5):
        await emulator.control.fault(PREEMPTED, latency=3)
        with pytest.raises(httpx.ReadTimeout):
            await client.get(PREEMPTED, headers=FLAVOR, timeout=0.3)


@pytest.mark.anyio
async def test_drop_fault_is_a_transport_error(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        await emulator.control.fault("/latest/api/token", drop=True, count=1)
        with pytest.raises(httpx.TransportError):
            await client.put("/latest/api/token", headers=TTL)
        assert (await client.put("/latest/api/token", headers=TTL)).status_code == 200


@pytest.mark.anyio
async def test_expire_tokens_fault(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        token = (await client.put("/latest/api/token", headers=TTL)).text
        headers = {"X-aws-ec2-metadata-token": token}
        assert (await client.get("/latest/meta-data/instance-id", headers=headers)).status_code == 200
        await emulator.control.fault("/latest/meta-data/", expire_tokens=True, count=1)
        assert (await client.get("/latest/meta-data/instance-id", headers=headers)).status_code == 401
        assert (await client.get("/latest/meta-data/instance-id", headers=headers)).status_code == 401  # stays dead
        fresh = {"X-aws-ec2-metadata-token": (await client.put("/latest/api/token", headers=TTL)).text}
        assert (await client.get("/latest/meta-data/instance-id", headers=fresh)).status_code == 200


@pytest.mark.anyio
async def test_duration_fault_expires(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        await emulator.control.fault(PREEMPTED, status=503, duration=0.3)
        assert (await client.get(PREEMPTED, headers=FLAVOR)).status_code == 503
        while (await client.get(PREEMPTED, headers=FLAVOR)).status_code == 503:
            await anyio.sleep(0.05)  # polling interval; bounded by fail_after
        listing = await emulator.control.requests(PREEMPTED)
        assert listing[-1]["status"] == 200


@pytest.mark.anyio
@pytest.mark.parametrize("params", [
    {}, {"status": 700}, {"latency": -1}, {"status": 503, "count": 0}, {"status": 503, "duration": 0},
    {"status": "503"}, {"status": 503, "colour": "red"}, {"drop": 1},
])
async def test_bad_faults_are_refused(emulator: RunningEmulator, params: dict[str, object]) -> None:
    with anyio.fail_after(5), pytest.raises(ControlError, match="HTTP 400"):
        await emulator.control.fault("/latest/", **params)
