"""The control API and its client: round trips, refusals, the request log, reset, stand-alone serving."""

from __future__ import annotations

import socket

import anyio
import httpx
import pytest

from spotguard.asgi import Bound
from spotguard.emulator import EmulatedInstance, EmulatorControl, run_emulator
from spotguard.errors import ConfigError, ControlError
from tests.support.emulator import RunningEmulator

FLAVOR = {"Metadata-Flavor": "Google"}


@pytest.mark.anyio
async def test_notice_round_trip_all_clouds(emulator: RunningEmulator) -> None:
    control = emulator.control
    with anyio.fail_after(5):
        ids = {
            "spot": await control.raise_notice("aws", "spot"),
            "scheduled": await control.raise_notice("aws", "scheduled", not_before_in_seconds=60),
            "preempted": await control.raise_notice("gcp", "preempted"),
            "event": await control.raise_notice("azure", "event"),
        }
        state = await control.notices()
        assert state["aws"]["spot"]["event_id"] == ids["spot"]
        assert state["aws"]["scheduled"][0]["EventId"] == ids["scheduled"]
        assert state["gcp"]["preempted"] == {**state["gcp"]["preempted"], "event_id": ids["preempted"], "value": "TRUE"}
        assert state["azure"]["Events"][0]["EventId"] == ids["event"]
        await control.withdraw("aws", ids["spot"])
        await control.withdraw("gcp", ids["preempted"])
        state = await control.notices()
        assert state["aws"]["spot"] is None and state["gcp"]["preempted"]["value"] == "FALSE"


@pytest.mark.anyio
@pytest.mark.parametrize(("cloud", "kind", "params", "message"), [
    ("oracle", "spot", {}, "'cloud' must be one of"),
    ("aws", "nuke", {}, "unknown notice kind"),
    ("aws", "spot", {"action": "explode"}, "'action' must be one of"),
    ("aws", "spot", {"in_secs": 5}, "unknown parameter"),
    ("aws", "spot", {"time": "tomorrow"}, "RFC 3339"),
    ("aws", "spot", {"time": "2030-01-01T00:00:00Z", "in_seconds": 5}, "either"),
    ("gcp", "maintenance", {"value": "SOON"}, "must be one of"),
    ("azure", "event", {"resources": "vm"}, "list"),
    ("azure", "event", {"not_before_in_seconds": "30"}, "must be"),
])
async def test_bad_notices_are_refused(emulator: RunningEmulator, cloud: str, kind: str,
                                       params: dict[str, object], message: str) -> None:
    with anyio.fail_after(5):
        with pytest.raises(ControlError, match=message):
            await emulator.control.raise_notice(cloud, kind, **params)
        assert (await emulator.control.notices())["aws"]["spot"] is None  # nothing half-raised


@pytest.mark.anyio
async def test_unknown_event_ids_and_endpoints(emulator: RunningEmulator) -> None:
    with anyio.fail_after(5):
        with pytest.raises(ControlError, match="HTTP 404"):
            await emulator.control.withdraw("azure", "no-such-event")
        with pytest.raises(ControlError, match="HTTP 404"):
            await emulator.control.change("aws", "spot-0", action="stop")
        event_id = await emulator.control.raise_notice("aws", "spot")
        with pytest.raises(ControlError, match="unknown parameter"):
            await emulator.control.change("aws", event_id, colour="red")
        async with httpx.AsyncClient(base_url=emulator.url) as http:
            assert (await http.get("/_emulator/nothing")).status_code == 404
            assert (await http.put("/_emulator/notices")).status_code == 405
            assert (await http.post("/_emulator/notices", content=b"[1]")).status_code == 400
            assert (await http.post("/_emulator/notices", content=b"{bad")).status_code == 400


@pytest.mark.anyio
async def test_request_log_and_reset(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        await client.get("/computeMetadata/v1/instance/preempted", headers=FLAVOR, params={"alt": "text"})
        await client.put("/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        everything = await emulator.control.requests()
        assert [e["path"] for e in everything] == ["/computeMetadata/v1/instance/preempted", "/latest/api/token"]
        gcp = (await emulator.control.requests("/computeMetadata/"))[0]
        assert (gcp["method"], gcp["query"], gcp["params"], gcp["status"]) == ("GET", "alt=text", {"alt": "text"}, 200)
        assert gcp["headers"]["metadata-flavor"] == "Google" and gcp["time"].endswith("Z") and gcp["timestamp"] > 0
        await emulator.control.raise_notice("gcp", "preempted")
        await emulator.control.fault("/latest/", status=500)
        await emulator.control.configure(require_v2=False)
        await emulator.control.reset()
        assert await emulator.control.requests() == []
        state = await emulator.control.notices()
        assert state["gcp"]["preempted"]["value"] == "FALSE" and state["aws"]["require_v2"] is True
        assert (await client.get("/latest/meta-data/instance-id")).status_code == 401  # fault gone, v2 again


@pytest.mark.anyio
async def test_standalone_emulator_with_custom_identity() -> None:
    instance = EmulatedInstance(instance_id="i-0fedcba9876543210", vm_name="rehearsal-vm")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            bound: Bound = await tg.start(lambda task_status: run_emulator(
                "127.0.0.1", 0, require_v2=False, instance=instance, task_status=task_status))
            assert bound.port != 0
            async with httpx.AsyncClient(base_url=bound.url) as http, EmulatorControl(bound.url) as control:
                assert (await http.get("/latest/meta-data/instance-id")).text == "i-0fedcba9876543210"
                event_id = await control.raise_notice("azure", "event")
                events = (await http.get("/metadata/scheduledevents", params={"api-version": "2020-07-01"},
                                         headers={"Metadata": "true"})).json()["Events"]
                assert events[0]["EventId"] == event_id and events[0]["Resources"] == ["rehearsal-vm"]
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with anyio.fail_after(5), pytest.raises(ConfigError, match="--listen"):
            await run_emulator("127.0.0.1", port)


@pytest.mark.anyio
async def test_control_client_against_nothing_is_a_control_error() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    async with EmulatorControl(f"http://127.0.0.1:{port}", timeout=2) as control:
        with anyio.fail_after(5), pytest.raises(ControlError, match="ConnectError"):
            await control.reset()
