"""The gate of a real ``spotguard run`` process under abuse: malformed and oversized HTTP, huge headers,
admin paths, malformed SSE from the engine. It answers or closes, never crashes, and its memory stays
bounded (peak RSS measured in /proc while the abuse runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotguard.gate.control import call
from tests.support._daemon import STARTED_CONFIGS
from tests.support._gate_process import GateProcess, exchange, status_of, wait_listening
from tests.support._processes import stop
from tests.support.moto import free_port
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio

SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class DaemonGate(GateProcess):
    daemon_url: str
    """The daemon that started the gate: its /metrics mirror the gate's counts."""


@pytest.fixture
async def gate_process(fake_engine: FakeEngine, tmp_path: Path) -> AsyncIterator[DaemonGate]:
    port, http_port = free_port(), free_port()
    config = tmp_path / "spotguard.toml"
    config.write_text(f"""
[agent]
cloud = "none"
state_dir = "{tmp_path}/state"
log_format = "json"
[http]
listen = "127.0.0.1:{http_port}"
[control]
socket = "{tmp_path}/control.sock"
[shutdown]
enabled = false
[gate]
listen = "127.0.0.1:{port}"
upstream = "{fake_engine.url}"
""")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([SPOTGUARD, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        await anyio.to_thread.run_sync(wait_listening, port, proc, log)
        # The memory measured is the gate's: a process of its own, started by the daemon.
        control = str(tmp_path / "gate.sock")
        pid = int((await call(control, "hello", timeout=5))["pid"])
        yield DaemonGate(f"http://127.0.0.1:{port}", port, pid, proc, log, control, f"http://127.0.0.1:{http_port}")
    finally:
        stop(proc)
        STARTED_CONFIGS.append(config)  # its gate outlives it by design: the autouse fixture stops it


async def healthy(gate: GateProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        chat = await client.post(gate.url + CHAT, json={"model": "m", "max_tokens": 3, "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and b"data: [DONE]" in chat.content
    assert gate.proc.poll() is None


async def test_malformed_and_oversized_http_is_answered_and_memory_stays_bounded(gate_process: DaemonGate) -> None:
    gate = gate_process
    with anyio.fail_after(120):
        await healthy(gate)
        gate.reset_peak()
        base = gate.rss_kib("VmRSS")
        cases = {
            "garbage request line": (b"\x00\x01\x02 nonsense\r\n\r\n", 0, {400, None}),
            "huge header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n", 0,
                            {400, 431, None}),
            "many headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 50_000 + b"\r\n", 0,
                             {200, 400, 431, None}),
            "bad content-length": (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 0,
                                   {400, None}),
            "two content-lengths": (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                    b"Content-Length: 9\r\n\r\nabc", 0, {400, None}),
            "bad chunking": (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\nnope\r\n", 0, {400}),
            "oversized journaled body": (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                         b"application/json\r\nContent-Length: 209715200\r\n\r\n", 100 << 20, {413}),
            "oversized body to an admin path": (b"POST /slots/0?action=restore HTTP/1.1\r\nHost: x\r\n"
                                                b"Content-Length: 209715200\r\n\r\n", 100 << 20, {403}),
            "encoded admin path": (b"POST /%73lots/0?action=erase HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 0,
                                   {403}),
            "huge query": (b"GET /v1/models?" + b"q" * (2 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 0,
                           {200, 400, 414, 431, None}),
        }
        seen = {}
        for name, (data, extra, expected) in cases.items():
            answer = await exchange(gate.port, data, body_stream=extra)
            seen[name] = status_of(answer)
            assert seen[name] in expected, (name, answer[:300])
        await healthy(gate)
        peak = gate.rss_kib("VmHWM")
        # The limits that acted reach the daemon's metrics (mirrored about once a second).
        wanted = ('spotguard_gate_limits_total{limit="max_head"}', 'spotguard_gate_limits_total{limit="max_body"}',
                  'spotguard_gate_requests_total{endpoint="chat",result="max_body"}')
        async with httpx.AsyncClient(timeout=5) as http:
            metrics = ""
            while not all(name in metrics for name in wanted):
                await anyio.sleep(0.1)
                metrics = (await http.get(gate.daemon_url + "/metrics")).text
    print(f"answers: {seen}; gate RSS {base / 1024:.0f} MiB, peak +{(peak - base) / 1024:.0f} MiB")
    # The oversized journaled body is refused from its Content-Length, unread; nothing else is buffered.
    assert (peak - base) / 1024 < 160, f"peak RSS grew by {(peak - base) / 1024:.0f} MiB: {seen}"


async def test_malformed_sse_from_the_engine_passes_through(gate_process: GateProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(30):
            answer = await client.post(gate_process.url + CHAT, json={
                "model": "m", "max_tokens": 4, "stream": True, "x_malformed": "sse",
                "messages": [{"role": "user", "content": "hi"}]})
            await healthy(gate_process)
    assert answer.status_code == 200 and b"data: [DONE]" in answer.content


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"BREW", b""]),
       path=st.binary(min_size=0, max_size=60),
       headers=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60)), max_size=6),
       body=st.binary(max_size=200))
async def test_random_requests_never_break_the_gate(gate_process: GateProcess, method: bytes, path: bytes,
                                                    headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    head = method + b" /" + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    with anyio.fail_after(30):
        answer = await exchange(gate_process.port, head)
    status = status_of(answer)
    assert status is None or 200 <= status < 600
    if status == 403:
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "forbidden"
    assert gate_process.proc.poll() is None
