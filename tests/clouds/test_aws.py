"""AWS sources against the emulator's IMDS over loopback: every kind, withdrawal, tokens, identity."""

from __future__ import annotations

from datetime import timedelta

import anyio
import httpx
import pytest

from spotguard.clouds import aws
from spotguard.errors import MetadataUnavailable
from spotguard.notice import parse_rfc3339, utcnow
from tests.clouds.helpers import config_for
from tests.support.emulator import RunningEmulator

pytestmark = pytest.mark.anyio


def sources(emulator: RunningEmulator, http: httpx.AsyncClient, **aws_config: object) -> dict[str, aws.AwsSource]:
    config = config_for(emulator.url, aws=dict(aws_config))
    return {source.name: source for source in aws.build_sources(config, http)}


async def test_only_the_spot_notice_is_polled_at_the_agent_cadence(emulator: RunningEmulator,
                                                                   http: httpx.AsyncClient) -> None:
    found = sources(emulator, http, slow_poll_interval=7.0)
    assert found["aws-spot"].interval is None  # [agent] poll_interval: it can give only 2 minutes
    assert {name: s.interval for name, s in found.items() if name != "aws-spot"} == {
        "aws-rebalance": 7.0, "aws-scheduled": 7.0, "aws-asg": 7.0}


async def test_nothing_raised_means_no_notices(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        for source in sources(emulator, http).values():
            assert await source.poll() == []
            assert source.hanging is False


async def test_spot_interruption_and_withdrawal(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    spot = sources(emulator, http)["aws-spot"]
    with anyio.fail_after(10):
        event_id = await emulator.control.raise_notice("aws", "spot", action="stop", in_seconds=120)
        [notice] = await spot.poll()
        state = (await emulator.control.notices())["aws"]["spot"]
        assert (notice.source, notice.kind, notice.action) == ("aws", "spot-interruption", "drain")
        assert notice.deadline == parse_rfc3339(state["time"])
        assert '"stop"' in notice.payload
        assert await spot.poll() == [notice]  # same body: same id, same detection time
        await emulator.control.withdraw("aws", event_id)
        assert await spot.poll() == []


async def test_rebalance_observe_by_default_drain_when_configured(emulator: RunningEmulator,
                                                                  http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        await emulator.control.raise_notice("aws", "rebalance")
        [observed] = await sources(emulator, http)["aws-rebalance"].poll()
        [drained] = await sources(emulator, http, rebalance_action="drain")["aws-rebalance"].poll()
        notice_time = parse_rfc3339((await emulator.control.notices())["aws"]["rebalance"]["noticeTime"])
    assert (observed.kind, observed.action, drained.action) == ("rebalance-recommendation", "observe", "drain")
    assert observed.deadline == notice_time + timedelta(seconds=120)
    assert observed.event_id == drained.event_id


@pytest.mark.parametrize("gone", ["canceled", "completed"])
async def test_scheduled_event_until_it_is_no_longer_active(emulator: RunningEmulator, http: httpx.AsyncClient,
                                                            gone: str) -> None:
    scheduled = sources(emulator, http, scheduled_lead=600)["aws-scheduled"]
    with anyio.fail_after(10):
        before = utcnow()
        event_id = await emulator.control.raise_notice("aws", "scheduled", code="instance-stop",
                                                       not_before_in_seconds=3600)
        after = utcnow()
        await emulator.control.raise_notice("aws", "scheduled", state="completed")  # history: ignored
        [notice] = await scheduled.poll()
        assert (notice.kind, notice.event_id, notice.action) == ("scheduled-event", event_id, "drain")
        assert notice.act_at == notice.deadline - timedelta(seconds=600)
        assert before + timedelta(seconds=3599) <= notice.deadline <= after + timedelta(seconds=3600)  # whole s
        assert not notice.due()
        await emulator.control.change("aws", event_id, state=gone)
        assert await scheduled.poll() == []


async def test_asg_terminated_keeps_its_deadline(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    asg = sources(emulator, http)["aws-asg"]
    with anyio.fail_after(10):
        assert await asg.poll() == []  # 404 on a brand-new instance
        event_id = await emulator.control.raise_notice("aws", "lifecycle", state="InService")
        assert await asg.poll() == []
        await emulator.control.change("aws", event_id, state="Terminated")
        [first] = await asg.poll()
        assert first.kind == "asg-terminated"
        assert first.deadline == first.detected_at + timedelta(seconds=aws.ASG_WINDOW)
        assert await asg.poll() == [first]
        await emulator.control.withdraw("aws", event_id)
        assert await asg.poll() == []


async def test_one_token_shared_by_all_sources(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    every = list(sources(emulator, http).values())
    with anyio.fail_after(10):
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for source in every:
                    tg.start_soon(source.poll)
        puts = [r for r in await emulator.control.requests(aws.TOKEN_PATH)]
        gets = await emulator.control.requests("/latest/meta-data/")
    assert len(puts) == 1 and puts[0]["method"] == "PUT"
    assert puts[0]["headers"][aws.TTL_HEADER.lower()] == "21600"
    assert len(gets) == 12 and all(r["headers"].get(aws.TOKEN_HEADER.lower()) for r in gets)


async def test_token_refreshed_before_expiry(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    spot = sources(emulator, http, token_ttl=1)["aws-spot"]
    with anyio.fail_after(10):
        while len(await emulator.control.requests(aws.TOKEN_PATH)) < 3:
            assert await spot.poll() == []  # never a 401: the token is replaced before it lapses
            await anyio.sleep(0.05)  # pacing like the runner's tick, not synchronisation
        statuses = {r["status"] for r in await emulator.control.requests("/latest/meta-data/")}
    assert statuses == {404}


async def test_401_fetches_a_new_token_and_retries_once(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    spot = sources(emulator, http)["aws-spot"]
    with anyio.fail_after(10):
        await emulator.control.raise_notice("aws", "spot")
        assert len(await spot.poll()) == 1
        await emulator.control.fault(aws.SPOT_PATH, expire_tokens=True, count=1)
        assert len(await spot.poll()) == 1
        log = await emulator.control.requests("/latest/")
        assert [(r["method"], r["status"]) for r in log] == [
            ("PUT", 200), ("GET", 200), ("GET", 401), ("PUT", 200), ("GET", 200)]
        await emulator.control.fault(aws.SPOT_PATH, status=401)
        with pytest.raises(MetadataUnavailable) as caught:
            await spot.poll()
    assert caught.value.reason == "unauthorized"
    assert len(await emulator.control.requests(aws.TOKEN_PATH)) == 3  # one more try, not a loop


async def test_imds_v1_sends_no_token(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        await emulator.control.configure(require_v2=False)
        await emulator.control.raise_notice("aws", "spot")
        [notice] = await sources(emulator, http, imds_version="v1")["aws-spot"].poll()
        assert notice.kind == "spot-interruption"
        assert await emulator.control.requests(aws.TOKEN_PATH) == []


async def test_token_put_timeout_says_so(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    config = config_for(emulator.url, request_timeout=0.3)
    spot = aws.build_sources(config, http)[0]
    with anyio.fail_after(10):
        await emulator.control.fault(aws.TOKEN_PATH, latency=3)
        with pytest.raises(MetadataUnavailable) as caught:
            await spot.poll()
    assert caught.value.reason == "token_timeout" and "hop limit" in str(caught.value)


async def test_identity(emulator: RunningEmulator, http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        me = await aws.identity(config_for(emulator.url), http)
    i = emulator.instance
    assert (me.cloud, me.instance_id, me.private_ip, me.region, me.zone) == (
        "aws", i.instance_id, i.local_ipv4, i.region, i.availability_zone)
