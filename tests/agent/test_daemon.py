"""``spotguard run`` as a real process against the in-process emulator: notices, signals, restarts."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support._daemon import daemon, system_state_env, write_config
from tests.support.emulator import RunningEmulator
from tests.support.moto import free_port

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("cloud", "kind", "params"), [
    ("aws", "spot", {"action": "terminate", "in_seconds": 120}),
    ("gcp", "preempted", {}),
    ("azure", "event", {"event_type": "Preempt", "not_before_in_seconds": 30}),
])
async def test_notice_drains_the_node_and_status_says_so(tmp_path: Path, emulator: RunningEmulator, cloud: str,
                                                         kind: str, params: dict[str, object]) -> None:
    port = free_port()
    config = write_config(tmp_path, cloud, emulator.url, port)
    with daemon(config, tmp_path / "daemon.log", f"http://127.0.0.1:{port}") as running:
        async with httpx.AsyncClient(timeout=2) as http:
            await running.readyz(http, 200)
            await emulator.control.raise_notice(cloud, kind, **params)
            await running.readyz(http, 503, timeout=5)
            doc = await running.until_status(http, lambda d: d["state"] == "drained")
    assert doc["cloud"] == cloud
    assert doc["notice"]["source"] == cloud
    assert set(doc["notice"]) >= {"source", "kind", "event_id", "deadline", "detected_at"}
    assert doc["notice"]["deadline"].endswith("Z")
    names = [s["name"] for s in doc["steps"]]
    assert {"readiness", "stop_accepting", "deregister", "wait_inflight", "snapshot", "acknowledge"} <= set(names)
    assert all({"name", "state", "outcome", "started_at", "finished_at", "detail"} <= set(s) for s in doc["steps"])
    if cloud == "azure":
        posts = [r for r in await emulator.control.requests("/metadata/scheduledevents") if r["method"] == "POST"]
        assert posts, "the acknowledge step approves the event (StartRequests)"


async def test_sigterm_while_serving_drains_then_exits(tmp_path: Path, emulator: RunningEmulator) -> None:
    port = free_port()
    config = write_config(tmp_path, "aws", emulator.url, port)
    env = system_state_env(tmp_path, "stopping")
    with daemon(config, tmp_path / "daemon.log", f"http://127.0.0.1:{port}", env=env) as running:
        async with httpx.AsyncClient(timeout=2) as http:
            await running.readyz(http, 200)
        running.signal(signal.SIGTERM)
        assert await running.wait_exit(15) == 0
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["state"] == "drained" and state["notice"]["source"] == "shutdown"


@pytest.mark.parametrize(("answer", "drains"), [("running", False), ("degraded", False), ("offline", True)])
async def test_sigterm_drains_only_when_the_machine_goes_away(tmp_path: Path, emulator: RunningEmulator,
                                                              answer: str, drains: bool) -> None:
    # `systemctl restart spotguard` on a running machine is an upgrade, not an eviction; a machine whose state
    # cannot be told (no systemd) is treated as going away, since a missed drain loses work.
    port = free_port()
    config = write_config(tmp_path, "aws", emulator.url, port)
    env = system_state_env(tmp_path, answer)
    with daemon(config, tmp_path / "daemon.log", f"http://127.0.0.1:{port}", env=env) as running:
        async with httpx.AsyncClient(timeout=2) as http:
            await running.readyz(http, 200)
        running.signal(signal.SIGTERM)
        assert await running.wait_exit(15) == 0
    state_file = tmp_path / "state" / "state.json"
    state = json.loads(state_file.read_text())["state"] if state_file.exists() else "serving"
    assert state == ("drained" if drains else "serving"), running.log_tail()


async def test_restart_after_kill_stays_out_of_rotation(tmp_path: Path, emulator: RunningEmulator) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, "aws", emulator.url, port)
    async with httpx.AsyncClient(timeout=2) as http:
        with daemon(config, tmp_path / "daemon.log", url) as running:
            await running.readyz(http, 200)
            await emulator.control.raise_notice("aws", "spot", in_seconds=120)
            await running.readyz(http, 503, timeout=5)
            running.signal(signal.SIGKILL)
        await emulator.control.reset()  # the notice is gone: only the persisted state keeps the node out
        with daemon(config, tmp_path / "daemon.log", url) as running:
            with anyio.fail_after(15):
                while True:
                    try:
                        response = await http.get(url + "/readyz")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.02)
            assert response.status_code == 503
