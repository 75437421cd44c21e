"""``spotguard run`` as a real process against the in-process emulator: notices, signals, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.emulator import RunningEmulator
from tests.support.moto import free_port

pytestmark = pytest.mark.anyio
SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))


def write_config(tmp: Path, cloud: str, emulator_url: str, port: int, extra: str = "") -> Path:
    path = tmp / "spotguard.toml"
    vm = '\nvm_name = "spotguard-vm"' if cloud == "azure" else ""
    path.write_text(f"""
[agent]
cloud = "{cloud}"
state_dir = "{tmp}/state"
log_format = "json"
[http]
listen = "127.0.0.1:{port}"
[control]
socket = "{tmp}/control.sock"
[shutdown]
budget = 10.0
[{cloud}]
metadata_url = "{emulator_url}"{vm}
{extra}
""")
    return path


@contextmanager
def daemon(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([SPOTGUARD, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def readyz(http: httpx.AsyncClient, url: str, want: int, timeout: float = 30.0) -> None:
    try:
        with anyio.fail_after(timeout):
            while True:
                try:
                    if (await http.get(url + "/readyz")).status_code == want:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.02)
    except TimeoutError:
        logs = sorted(Path("/tmp").glob("pytest-of-*/pytest-current/*/daemon.log"), key=lambda p: p.stat().st_mtime)
        tail = logs[-1].read_text()[-3000:] if logs else "(no daemon log found)"
        raise AssertionError(f"/readyz never answered {want} within {timeout}s; daemon log:\n{tail}") from None


@pytest.mark.parametrize(("cloud", "kind", "params"), [
    ("aws", "spot", {"action": "terminate", "in_seconds": 120}),
    ("gcp", "preempted", {}),
    ("azure", "event", {"event_type": "Preempt", "not_before_in_seconds": 30}),
])
async def test_notice_drains_the_node_and_status_says_so(tmp_path: Path, emulator: RunningEmulator, cloud: str,
                                                         kind: str, params: dict[str, object]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, cloud, emulator.url, port)
    with daemon(config, tmp_path / "daemon.log"):
        async with httpx.AsyncClient(timeout=2) as http:
            await readyz(http, url, 200)
            await emulator.control.raise_notice(cloud, kind, **params)
            await readyz(http, url, 503, timeout=5)
            with anyio.fail_after(15):
                while (doc := (await http.get(url + "/status")).json())["state"] != "drained":
                    await anyio.sleep(0.02)
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
    with daemon(config, tmp_path / "daemon.log") as proc:
        async with httpx.AsyncClient(timeout=2) as http:
            await readyz(http, f"http://127.0.0.1:{port}", 200)
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            while proc.poll() is None:
                await anyio.sleep(0.02)
    assert proc.returncode == 0
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["state"] == "drained" and state["notice"]["source"] == "shutdown"


async def test_restart_after_kill_stays_out_of_rotation(tmp_path: Path, emulator: RunningEmulator) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, "aws", emulator.url, port)
    async with httpx.AsyncClient(timeout=2) as http:
        with daemon(config, tmp_path / "daemon.log") as proc:
            await readyz(http, url, 200)
            await emulator.control.raise_notice("aws", "spot", in_seconds=120)
            await readyz(http, url, 503, timeout=5)
            os.kill(proc.pid, signal.SIGKILL)
        await emulator.control.reset()  # the notice is gone: only the persisted state keeps the node out
        with daemon(config, tmp_path / "daemon.log"):
            with anyio.fail_after(15):
                while True:
                    try:
                        response = await http.get(url + "/readyz")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.02)
            assert response.status_code == 503
