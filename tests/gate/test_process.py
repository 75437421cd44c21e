"""The gate as its own process: ``spotguard run`` starts it, it outlives the daemon, the daemon re-attaches,
and a gate that dies is noticed and brought back. Real processes over loopback: the daemon and the
gate; the engine is the in-process fake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.control import client as control
from spotguard.errors import GateError
from spotguard.gate.control import call
from spotguard.gate.link import RemoteJournal
from spotguard.gate.protocol import HeldState
from tests.support.moto import free_port
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio
SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))
CHAT = "/v1/chat/completions"


def write_config(tmp: Path, engine_url: str) -> tuple[Path, str, str]:
    """Config file, the daemon's URL, the gate's URL."""
    http_port, gate_port = free_port(), free_port()
    path = tmp / "spotguard.toml"
    path.write_text(f"""
[agent]
cloud = "none"
state_dir = "{tmp}/state"
log_format = "json"
[http]
listen = "127.0.0.1:{http_port}"
[control]
socket = "{tmp}/control.sock"
[gate]
listen = "127.0.0.1:{gate_port}"
upstream = "{engine_url}"
""")
    return path, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gate_port}"


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


@pytest.fixture
async def gate_socket(tmp_path: Path) -> AsyncIterator[str]:
    """The gate's control socket; whatever gate answers there is stopped at the end (it outlives daemons)."""
    path = str(tmp_path / "gate.sock")
    yield path
    try:
        pid = int((await call(path, "hello", timeout=2))["pid"])
    except GateError:
        return
    os.kill(pid, signal.SIGKILL)


async def metric(http: httpx.AsyncClient, url: str, name: str) -> float:
    for line in (await http.get(url + "/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def until(check: object, timeout: float = 20.0) -> None:
    """Await ``check()`` until it is true; every wait is bounded."""
    with anyio.fail_after(timeout):
        while True:
            try:
                if await check():  # type: ignore[operator]
                    return
            except (httpx.TransportError, GateError):
                pass
            await anyio.sleep(0.02)


async def stream(http: httpx.AsyncClient, url: str, events: list[str], first: anyio.Event, **extra: object) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra})
    async with http.stream("POST", url + CHAT, content=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first.set()


async def test_daemon_killed_mid_stream_then_restarted_reattaches(tmp_path: Path, fake_engine: FakeEngine,
                                                                  gate_socket: str) -> None:
    config, daemon_url, gate_url = write_config(tmp_path, fake_engine.url)
    log = tmp_path / "daemon.log"
    short: list[list[str]] = [[] for _ in range(4)]
    held: list[str] = []
    async with httpx.AsyncClient(timeout=30) as http, anyio.create_task_group() as tg:
        with daemon(config, log) as first_daemon:
            await until(lambda: _ready(http, daemon_url))
            gate_pid = int((await call(gate_socket, "hello", timeout=2))["pid"])
            assert gate_pid != first_daemon.pid
            # Four streams that take ~1 s each, and one that waits for us: all through the gate.
            started = [anyio.Event() for _ in short]
            for events, first in zip(short, started, strict=True):
                tg.start_soon(lambda e=events, f=first: stream(http, gate_url, e, f, max_tokens=20, x_token_delay=0.05))
            held_first = anyio.Event()
            tg.start_soon(lambda: stream(http, gate_url, held, held_first, max_tokens=4, x_hold_after=1))
            with anyio.fail_after(10):
                for first in [*started, held_first]:
                    await first.wait()
            before_restart = datetime.now(UTC)
            first_daemon.send_signal(signal.SIGKILL)
        # The daemon is gone; the streams carry on to their end.
        with anyio.fail_after(20):
            while not all(events and events[-1] == "[DONE]" for events in short):
                await anyio.sleep(0.02)
        assert all(len(events) == 22 for events in short)  # 20 tokens, the finish chunk, [DONE]

        with daemon(config, log):
            await until(lambda: _ready(http, daemon_url))
            await until(lambda: _metric_is(http, daemon_url, "spotguard_gate_inflight_requests", 1.0))
            assert int((await call(gate_socket, "hello", timeout=2))["pid"]) == gate_pid  # attached, not a new one
            [entry] = await RemoteJournal(gate_socket).entries()
            assert entry.started_at < before_restart and entry.output == "tok0 "
            await control.drain(str(tmp_path / "control.sock"), reason="test", deadline_seconds=60)
            await until(lambda: _refused(http, gate_url))
            fake_engine.release.set()
            with anyio.fail_after(20):
                while not (held and held[-1] == "[DONE]"):
                    await anyio.sleep(0.02)
    attached = [json.loads(line) for line in log.read_text().splitlines() if '"gate_attached"' in line]
    assert [a["started_by_us"] for a in attached] == [True, False]


async def test_gate_crash_is_noticed_and_the_gate_restarted(tmp_path: Path, fake_engine: FakeEngine,
                                                            gate_socket: str) -> None:
    config, daemon_url, gate_url = write_config(tmp_path, fake_engine.url)
    log = tmp_path / "daemon.log"
    async with httpx.AsyncClient(timeout=10) as http:
        with daemon(config, log):
            await until(lambda: _ready(http, daemon_url))
            await until(lambda: _metric_is(http, daemon_url, "spotguard_gate_up", 1.0))
            pid = int((await call(gate_socket, "hello", timeout=2))["pid"])
            os.kill(pid, signal.SIGKILL)
            await until(lambda: _metric_is(http, daemon_url, "spotguard_gate_failures_total", 1.0))
            await until(lambda: _metric_is(http, daemon_url, "spotguard_gate_up", 1.0))
            assert int((await call(gate_socket, "hello", timeout=2))["pid"]) != pid
            assert await metric(http, daemon_url, "spotguard_gate_starts_total") == 2.0
            answer = await http.post(gate_url + "/v1/completions", content=b'{"prompt":"x","max_tokens":2}')
            assert answer.status_code == 200
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert "gate_down" in events and events.count("gate_attached") == 2


async def test_a_gate_restarted_mid_drain_is_put_back_on_the_declared_state(tmp_path: Path, fake_engine: FakeEngine,
                                                                           gate_socket: str) -> None:
    config, daemon_url, gate_url = write_config(tmp_path, fake_engine.url)
    async with httpx.AsyncClient(timeout=10) as http:
        with daemon(config, tmp_path / "daemon.log"):
            await until(lambda: _ready(http, daemon_url))
            await control.drain(str(tmp_path / "control.sock"), reason="test", deadline_seconds=60)
            await until(lambda: _refused(http, gate_url))
            before = HeldState.from_wire((await call(gate_socket, "stats", timeout=2))["holding"])
            assert before.state.draining and before.state.vm_deadline is not None
            pid = int((await call(gate_socket, "hello", timeout=2))["pid"])
            os.kill(pid, signal.SIGKILL)  # the new gate knows nothing of the drain until the daemon declares it
            await until(lambda: _metric_is(http, daemon_url, "spotguard_gate_starts_total", 2.0))
            await until(lambda: _refused(http, gate_url))
            after = HeldState.from_wire((await call(gate_socket, "stats", timeout=2))["holding"])
    assert after.holds(before.state) and after.state.vm_deadline == before.state.vm_deadline


async def _ready(http: httpx.AsyncClient, url: str) -> bool:
    return (await http.get(url + "/readyz")).status_code == 200 and await _metric_is(http, url, "spotguard_gate_up", 1.0)


async def _metric_is(http: httpx.AsyncClient, url: str, name: str, value: float) -> bool:
    return await metric(http, url, name) == value


async def _refused(http: httpx.AsyncClient, url: str) -> bool:
    answer = await http.post(url + "/v1/completions", content=b'{"prompt":"x","max_tokens":1}')
    return answer.status_code == 503 and answer.headers.get("retry-after") == "5"


async def test_gate_alone_doctor_and_stop(tmp_path: Path, fake_engine: FakeEngine, gate_socket: str) -> None:
    """`spotguard gate` on its own: doctor sees it (and its 0600 socket), `--stop` ends it cleanly."""
    from spotguard import config as configuration
    from spotguard.doctor import gate_check

    path, _, gate_url = write_config(tmp_path, fake_engine.url)
    cfg = configuration.load(path, environ={})
    assert (await gate_check(cfg)).level == "warning"  # none yet; `spotguard run` would start one
    assert (await gate_check(cfg.replace("gate", start="external"))).level == "error"
    with open(tmp_path / "gate.log", "wb") as out:
        gate = subprocess.Popen([SPOTGUARD, "gate", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        await until(lambda: _answers(gate_socket))
        check = await gate_check(cfg)
        assert check.level == "ok" and f"pid {gate.pid}" in check.detail, check.detail
        assert oct(os.stat(gate_socket).st_mode & 0o777) == oct(0o600)
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(gate_url + "/v1/models")).status_code == 200
        stopped = subprocess.run([SPOTGUARD, "gate", "--stop", "--config", str(path)], capture_output=True, timeout=30)
        assert stopped.returncode == 0, stopped.stderr
        with anyio.fail_after(20):
            while gate.poll() is None:
                await anyio.sleep(0.02)
        assert gate.returncode == 0 and not os.path.exists(gate_socket)
    finally:
        if gate.poll() is None:
            gate.kill()
        gate.wait(timeout=10)


async def _answers(path: str) -> bool:
    await call(path, "hello", timeout=2)
    return True
