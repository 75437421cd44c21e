"""Fake inference engines as real processes (tests/servers/fake_engine.py), one per test.

``start_engine`` starts one and waits until it listens; ``RunningEngine`` has its URLs, pid and pid
file, the test hooks (in-flight count, metrics override, hang, health) and a bounded wait for its exit.
The hooks go to the engine's control port, which stays up after SIGTERM even for kinds whose own HTTP
server goes away then (vLLM, TGI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "servers" / "fake_engine.py"
START_TIMEOUT = 30.0
"""Python + uvicorn start-up on a busy 2-core machine; a healthy start takes well under a second."""


@dataclass
class RunningEngine:
    kind: str
    proc: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    pid_file: Path
    log: Path
    control_url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _post(self, path: str, content: bytes) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            (await client.post(f"{self.control_url}{path}", content=content)).raise_for_status()

    async def set_inflight(self, running: int, waiting: int = 0) -> None:
        await self._post("/_test/inflight", json.dumps({"running": running, "waiting": waiting}).encode())

    async def serve_raw(self, text: str) -> None:
        """Serve ``text`` as the metrics page (or /slots body for llamacpp) from now on."""
        await self._post("/_test/metrics", text.encode())

    async def hang(self) -> None:
        """Make every metrics (or /slots) request hang from now on."""
        await self._post("/_test/hang", b"")

    async def set_healthy(self, healthy: bool) -> None:
        """Make the kind's health endpoint answer as a loading or crashed engine does (or healthy again)."""
        await self._post("/_test/health", json.dumps({"healthy": healthy}).encode())

    async def state(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.control_url}/_test/state")
            response.raise_for_status()
            return dict(response.json())

    async def wait_exit(self, timeout: float) -> int:
        """The exit status, waiting at most ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.02)
        return int(self.proc.returncode)

    async def wait_signals(self, timeout: float) -> list[str]:
        """The signals the engine has recorded, once there is at least one."""
        with anyio.fail_after(timeout):
            while not (signals := (await self.state())["signals"]):
                await anyio.sleep(0.02)
        return list(signals)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


StartEngine = Callable[..., Awaitable[RunningEngine]]


@pytest.fixture
def start_engine(tmp_path: Path) -> Iterator[StartEngine]:
    """``await start_engine("vllm", "--shutdown-timeout", "30")``: a fake engine process, killed at teardown."""
    started: list[RunningEngine] = []

    async def start(kind: str, *args: str) -> RunningEngine:
        index = len(started)
        ready = tmp_path / f"{kind}-{index}.ready"
        pid_file = tmp_path / f"{kind}-{index}.pid"
        log = tmp_path / f"{kind}-{index}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(FAKE_ENGINE), kind, "0", "--ready-file", str(ready),
                                     "--pid-file", str(pid_file), *args],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        engine = RunningEngine(kind, proc, "", "", pid_file, log)
        started.append(engine)
        with anyio.fail_after(START_TIMEOUT):
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"fake {kind} engine exited {proc.returncode}:\n{engine.output()}")
                await anyio.sleep(0.02)
        info = json.loads(ready.read_text())
        engine.url = f"http://127.0.0.1:{info['port']}"
        engine.metrics_url = f"http://127.0.0.1:{info['metrics_port']}/metrics"
        engine.control_url = f"http://127.0.0.1:{info['control_port']}"
        return engine

    yield start
    for engine in started:
        if engine.proc.poll() is None:
            os.kill(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait(timeout=10)
