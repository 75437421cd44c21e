"""GCE metadata as the emulator serves it: headers, ETags and hanging GETs that wake on change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

from spotguard.asgi import Bound
from spotguard.emulator import EmulatorApp, run_emulator
from tests.support.emulator import RunningEmulator

V1 = "/computeMetadata/v1"
FLAVOR = {"Metadata-Flavor": "Google"}


@pytest.mark.anyio
async def test_flavor_header_required_and_echoed(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        missing = await client.get(V1 + "/instance/preempted")
        assert missing.status_code == 403
        assert missing.headers["metadata-flavor"] == "Google"
        assert "Missing Metadata-Flavor:Google header" in missing.text
        wrong = await client.get(V1 + "/instance/preempted", headers={"Metadata-Flavor": "Amazon"})
        assert wrong.status_code == 403
        forwarded = await client.get(V1 + "/instance/preempted", headers={**FLAVOR, "X-Forwarded-For": "1.2.3.4"})
        assert forwarded.status_code == 403
        ok = await client.get(V1 + "/instance/preempted", headers=FLAVOR)
        assert (ok.status_code, ok.text, ok.headers["metadata-flavor"]) == (200, "FALSE", "Google")
        assert ok.headers["etag"]
        assert (await client.get(V1 + "/instance/nothing", headers=FLAVOR)).status_code == 404


@pytest.mark.anyio
async def test_identity_paths_and_token(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    i = emulator.instance
    expected = {
        "/instance/id": i.gcp_instance_id, "/instance/name": "spotguard-vm",
        "/instance/zone": f"projects/{i.gcp_project_number}/zones/us-central1-a",
        "/instance/network-interfaces/0/ip": i.gcp_ip, "/project/project-id": "spotguard-test",
        "/instance/maintenance-event": "NONE",
    }
    with anyio.fail_after(5):
        for path, value in expected.items():
            answer = await client.get(V1 + path, headers=FLAVOR)
            assert (answer.status_code, answer.text) == (200, value), path
        token = await client.get(V1 + "/instance/service-accounts/default/token", headers=FLAVOR)
        assert token.headers["content-type"] == "application/json"
        body = token.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] > 0 and body["access_token"]


@pytest.mark.anyio
async def test_preempted_notice_changes_value_and_etag(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        before = await client.get(V1 + "/instance/preempted", headers=FLAVOR)
        event_id = await emulator.control.raise_notice("gcp", "preempted")
        during = await client.get(V1 + "/instance/preempted", headers=FLAVOR)
        assert during.text == "TRUE" and during.headers["etag"] != before.headers["etag"]
        await emulator.control.withdraw("gcp", event_id)
        after = await client.get(V1 + "/instance/preempted", headers=FLAVOR)
        assert after.text == "FALSE" and after.headers["etag"] != during.headers["etag"]


@pytest.mark.anyio
async def test_hanging_get_with_stale_etag_answers_at_once(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(2):
        answer = await client.get(V1 + "/instance/preempted", headers=FLAVOR,
                                  params={"wait_for_change": "true", "last_etag": "0", "timeout_sec": "60"})
    assert answer.text == "FALSE"


@pytest.mark.anyio
async def test_hanging_get_times_out_with_same_value(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    first = await client.get(V1 + "/instance/preempted", headers=FLAVOR)
    answers: list[httpx.Response] = []

    async def hang() -> None:
        answers.append(await client.get(V1 + "/instance/preempted", headers=FLAVOR, params={
            "wait_for_change": "true", "last_etag": first.headers["etag"], "timeout_sec": "1"}))

    with anyio.fail_after(4):  # hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            while len(await emulator.control.requests(V1 + "/instance/preempted")) < 2:
                await anyio.sleep(0.01)  # until the hanging GET has reached the server
            assert answers == []  # it hangs: no answer while nothing changes
    (answer,) = answers
    assert (answer.text, answer.headers["etag"]) == ("FALSE", first.headers["etag"])
    bad = await client.get(V1 + "/instance/preempted", headers=FLAVOR,
                           params={"wait_for_change": "true", "timeout_sec": "soon"})
    assert bad.status_code == 400


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "path", "value"), [
    ("preempted", "/instance/preempted", "TRUE"),
    ("maintenance", "/instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE"),
])
async def test_hanging_get_wakes_on_change(emulator: RunningEmulator, client: httpx.AsyncClient,
                                           kind: str, path: str, value: str) -> None:
    # Woken by the change, not by its 30 s timeout (fail_after(5) would end the test first): the answer
    # carries the new value and ETag. How fast it wakes is bench/detect.py's figure.
    first = await client.get(V1 + path, headers=FLAVOR)
    answers: list[httpx.Response] = []

    async def hang() -> None:
        answers.append(await client.get(V1 + path, headers=FLAVOR, params={
            "wait_for_change": "true", "last_etag": first.headers["etag"], "timeout_sec": "30"}))

    with anyio.fail_after(5):  # hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            while len(await emulator.control.requests(V1 + path)) < 2:
                await anyio.sleep(0.01)  # wait until the hanging GET has reached the server
            assert answers == []
            await emulator.control.raise_notice("gcp", kind)
    (answer,) = answers
    assert answer.text == value and answer.headers["etag"] != first.headers["etag"]


@pytest.mark.anyio
async def test_maintenance_event_change_and_withdraw(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(5):
        event_id = await emulator.control.raise_notice("gcp", "maintenance", value="MIGRATE_ON_HOST_MAINTENANCE")
        assert (await client.get(V1 + "/instance/maintenance-event", headers=FLAVOR)).text == \
            "MIGRATE_ON_HOST_MAINTENANCE"
        await emulator.control.change("gcp", event_id, value="TERMINATE_ON_HOST_MAINTENANCE")
        assert (await client.get(V1 + "/instance/maintenance-event", headers=FLAVOR)).text == \
            "TERMINATE_ON_HOST_MAINTENANCE"
        await emulator.control.withdraw("gcp", event_id)
        assert (await client.get(V1 + "/instance/maintenance-event", headers=FLAVOR)).text == "NONE"


@pytest.mark.anyio
async def test_abandoned_hanging_get_is_let_go(emulator: RunningEmulator) -> None:
    with anyio.fail_after(5):
        async with httpx.AsyncClient(base_url=emulator.url) as http:
            with anyio.move_on_after(0.2):
                await http.get(V1 + "/instance/preempted", headers=FLAVOR,
                               params={"wait_for_change": "true", "timeout_sec": "3600"})
        entries = await emulator.control.requests(V1 + "/instance/preempted")
        assert entries[0]["status"] is None  # never answered: the client hung up first
        answer = await emulator.control.requests()
        assert len(answer) == 1


@pytest.mark.anyio
async def test_shutdown_with_hanging_gets_open_is_prompt() -> None:
    app = EmulatorApp()
    outcomes: list[str] = []

    async def hang(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            try:
                answer = await http.get(V1 + "/instance/preempted", headers=FLAVOR,
                                        params={"wait_for_change": "true", "timeout_sec": "3600"})
                outcomes.append(str(answer.status_code))
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)

    # The GETs would hang for an hour: that all three end inside fail_after(5) is what stopping does.
    with anyio.fail_after(5):  # hang guard
        async with anyio.create_task_group() as clients:
            async with anyio.create_task_group() as server:
                bound: Bound = await server.start(run_emulator, "127.0.0.1", 0, app)
                for _ in range(3):
                    clients.start_soon(hang, bound.url)
                while len(app.log) < 3:
                    await anyio.sleep(0.01)  # until all three GETs hang on the server
                server.cancel_scope.cancel()
        assert len(outcomes) == 3


@pytest.mark.anyio
async def test_gpu_maintenance_announces_its_window(emulator: RunningEmulator, client: httpx.AsyncClient) -> None:
    upcoming = V1 + "/instance/upcoming-maintenance"
    with anyio.fail_after(5):
        assert (await client.get(upcoming, params={"alt": "json"}, headers=FLAVOR)).text == "{ }"
        policy = await client.get(V1 + "/instance/scheduling/on-host-maintenance", headers=FLAVOR)
        assert policy.text == "TERMINATE"  # a GPU VM cannot live-migrate
        event_id = await emulator.control.raise_notice("gcp", "maintenance")
        answer = await client.get(upcoming, params={"alt": "json"}, headers=FLAVOR)
        event = await client.get(V1 + "/instance/maintenance-event", headers=FLAVOR)
        await emulator.control.withdraw("gcp", event_id)
        after = await client.get(upcoming, params={"alt": "json"}, headers=FLAVOR)
    assert event.text == "TERMINATE_ON_HOST_MAINTENANCE"
    assert answer.headers["content-type"] == "application/json" and answer.headers["etag"]
    window = answer.json()
    assert set(window) == {"can_reschedule", "latest_window_start_time", "maintenance_status", "type",
                           "window_end_time", "window_start_time"}
    assert (window["maintenance_status"], window["type"]) == ("PENDING", "SCHEDULED")
    start = datetime.fromisoformat(window["window_start_time"].replace("Z", "+00:00"))
    assert timedelta(minutes=59) < start - datetime.now(UTC) <= timedelta(hours=1)  # the GPU VM's notice
    assert after.text == "{ }"
