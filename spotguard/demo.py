"""``spotguard demo``: a full simulated eviction on loopback, with no cloud and no credentials.

It starts the metadata emulator, a stand-in inference server (a real process that records the signal
it receives), and the daemon; raises a notice on the emulator; and prints what the daemon saw and did,
with timings, from its own /status document.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from spotguard import logs
from spotguard.agent.daemon import Daemon
from spotguard.config import Config, load
from spotguard.control.render import format_status
from spotguard.emulator import EmulatorApp, EmulatorControl, run_emulator

NOTICES: dict[str, tuple[str, dict[str, Any]]] = {
    "aws": ("spot", {"action": "terminate", "in_seconds": 120}),
    "gcp": ("preempted", {}),
    "azure": ("event", {"event_type": "Preempt", "not_before_in_seconds": 30}),
}

STAND_IN = """
import signal, sys, time
def on_term(signum, frame):
    open(sys.argv[1], "w").write("SIGTERM received: stopped taking new work\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(3600)
"""


def _config(tmp: Path, cloud: str, emulator_url: str, engine_pid: int) -> Config:
    return load(None, environ={}, overrides={
        "agent": {"cloud": cloud, "state_dir": str(tmp / "state"), "log_format": "json", "log_level": "error"},
        "http": {"listen": "127.0.0.1:0"},
        "control": {"socket": str(tmp / "control.sock")},
        cloud: {"metadata_url": emulator_url, **({"vm_name": "spotguard-vm"} if cloud == "azure" else {})},
        "server": {"kind": "command", "stop_command": ["kill", "-TERM", str(engine_pid)]},
        "drain": {"wait_inflight_budget": 2.0},
    })


async def run_demo(cloud: str = "aws") -> int:
    logs.configure("json", "error", stream=open("/dev/null", "w"))  # the demo prints its own story
    with tempfile.TemporaryDirectory(prefix="spotguard-demo-") as tmp_name:
        tmp = Path(tmp_name)
        marker = tmp / "engine-stopped.txt"
        engine = subprocess.Popen([sys.executable, "-c", STAND_IN, str(marker)])
        try:
            return await _story(tmp, cloud, engine, marker)
        finally:
            if engine.poll() is None:
                engine.kill()
            engine.wait(timeout=5)


async def _story(tmp: Path, cloud: str, engine: subprocess.Popen[bytes], marker: Path) -> int:
    say = print
    async with anyio.create_task_group() as tg:
        emulator = await tg.start(run_emulator, "127.0.0.1", 0, EmulatorApp())
        say(f"1. metadata emulator for {cloud} on {emulator.url}")
        say(f"2. stand-in inference server running (pid {engine.pid})")
        t0 = time.perf_counter()
        daemon: Daemon = await tg.start(lambda task_status: Daemon(
            _config(tmp, cloud, emulator.url, engine.pid)).run(task_status=task_status))
        assert daemon.http_bound is not None
        url = daemon.http_bound.url
        async with httpx.AsyncClient(timeout=2) as http, EmulatorControl(emulator.url) as control:
            ready = (await http.get(url + "/readyz")).status_code
            say(f"3. spotguard running on {url}: /readyz {ready} after {time.perf_counter() - t0:.2f}s")
            kind, params = NOTICES[cloud]
            raised = time.perf_counter()
            await control.raise_notice(cloud, kind, **params)
            say(f"4. {cloud} eviction notice raised on the emulator ({kind})")
            with anyio.fail_after(10):
                while (await http.get(url + "/readyz")).status_code != 503:
                    await anyio.sleep(0.005)
            say(f"5. /readyz answers 503 after {1000 * (time.perf_counter() - raised):.0f} ms: "
                "load-balancer health checks drop the node")
            with anyio.fail_after(30):
                while (doc := (await http.get(url + "/status")).json())["state"] != "drained":
                    await anyio.sleep(0.02)
            say(f"6. drained {time.perf_counter() - raised:.2f}s after the notice")
            with anyio.fail_after(5):
                while not marker.exists():
                    await anyio.sleep(0.01)
            say(f"7. stand-in server: {marker.read_text().strip()}")
            if cloud == "azure":
                approvals = await control.requests(path="/metadata/scheduledevents")
                posted = [r for r in approvals if r.get("method") == "POST"]
                say(f"8. Azure StartRequests sent to the emulator: {len(posted)}")
            say("\nspotguard status:\n" + format_status(doc))
        tg.cancel_scope.cancel()
    return 0
