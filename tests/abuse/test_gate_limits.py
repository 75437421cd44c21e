"""The gate process against abusive clients, over raw sockets: slow, silent and idle ones, more connections
than file descriptors, bodies piled up behind a stream or never finished, heads too big, requests that are
not HTTP/1.1 as the gate accepts it. Each limit is a ``[gate]`` key (made short here: no test waits 60 s),
acts the way nginx's does, and is counted (``spotguard_gate_limits_total``, through the gate's stats)."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support._gate_process import (
    GateProcess,
    closed_within,
    exchange,
    gate_process,
    read_response,
    status_of,
)
from tests.support._quirky_engine import quirky_engine
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = b"/v1/chat/completions"
MiB = 1 << 20
FAST = """
head_timeout = 1.0
body_timeout = 1.0
keepalive_timeout = 1.5
"""


def chat_body(**extra: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def post(path: bytes, body: bytes, *, length: int | None = None, close: bool = False) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body) if length is None else length, b"Connection: close\r\n" if close else b"")) + body


async def healthy(gate: GateProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        chat = await client.post(gate.url + CHAT.decode(), content=chat_body(max_tokens=3, stream=True))
    assert chat.status_code == 200 and b"data: [DONE]" in chat.content
    assert gate.proc.poll() is None


async def trickle(stream: anyio.abc.SocketStream, data: bytes, pause: float) -> tuple[bool, bytes]:
    """Send ``data`` a byte every ``pause`` seconds, watching for the gate to close: (closed, what came back)."""
    got = b""
    for byte in data:
        try:
            await stream.send(bytes([byte]))
        except (anyio.BrokenResourceError, OSError):
            return True, got
        with anyio.move_on_after(pause):
            try:
                got += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return True, got
    return False, got


async def test_slow_silent_and_idle_clients_are_closed_and_busy_ones_are_not(fake_engine: FakeEngine,
                                                                            tmp_path: Path) -> None:
    """nginx closes a slowloris head, a body that stalls, a silent socket and an idle keep-alive at 60/60/60/75 s;
    the gate kept all four open. A stream that outlasts every timeout, and a client that keeps its connection
    busy, are left alone."""
    results: dict[str, tuple[bool, bytes, float]] = {}

    async def slow_head() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
            start = time.monotonic()
            closed, got = await trickle(stream, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200, 0.05)
            results["slow head"] = (closed, got, time.monotonic() - start)

    async def stalled_body() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
            start = time.monotonic()
            await stream.send(post(CHAT, b'{"model": ', length=100))
            closed, got = await closed_within(stream, 10)
            results["stalled body"] = (closed, got, time.monotonic() - start)

    async def silent() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
            start = time.monotonic()
            closed, got = await closed_within(stream, 10)
            results["silent"] = (closed, got, time.monotonic() - start)

    async def idle_keepalive() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
            await stream.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(await read_response(stream)) == 200
            start = time.monotonic()
            closed, got = await closed_within(stream, 10)
            results["idle keep-alive"] = (closed, got, time.monotonic() - start)

    async def long_stream() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
            await stream.send(post(CHAT, chat_body(stream=True, max_tokens=12, x_token_delay=0.3), close=True))
            closed, got = await closed_within(stream, 20)
            results["long stream"] = (closed, got, 0.0)

    async def busy_keepalive() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
            answers = b""
            for _ in range(8):  # 8 requests 0.5 s apart: longer than keepalive_timeout in all
                await stream.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answers += await read_response(stream)
                await anyio.sleep(0.5)
            results["busy keep-alive"] = (False, answers, 0.0)

    with gate_process(tmp_path, fake_engine.url, FAST) as gate:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for check in (slow_head, stalled_body, silent, idle_keepalive, long_stream, busy_keepalive):
                    tg.start_soon(check)
            counts = {limit: await gate.limit_count(limit)
                      for limit in ("head_timeout", "body_timeout", "keepalive_timeout")}
    for name in ("slow head", "stalled body", "silent", "idle keep-alive"):
        closed, got, took = results[name]
        assert closed and took < 8, (name, results[name])
    assert status_of(results["slow head"][1]) == 408 and status_of(results["stalled body"][1]) == 408
    assert results["silent"][1] == b"" and results["idle keep-alive"][1] == b""  # closed without a word, as nginx
    assert results["long stream"][1].count(b"tok") == 12 and b"data: [DONE]" in results["long stream"][1]
    assert results["busy keep-alive"][1].count(b"HTTP/1.1 200") == 8
    assert counts["head_timeout"] >= 2 and counts["body_timeout"] >= 1 and counts["keepalive_timeout"] >= 1, counts


def _nofile(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _still_open(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


async def test_a_shells_low_fd_limit_is_raised_at_start(fake_engine: FakeEngine, tmp_path: Path) -> None:
    """``start = auto`` inherits the shell's soft limit (1024; 128 here): 300 idle sockets then locked real
    clients out (each new connection reset) until the attacker left. The gate raises it to the hard limit."""
    with gate_process(tmp_path, fake_engine.url, preexec_fn=_nofile(128, 4096)) as gate:
        idle = [socket.create_connection(("127.0.0.1", gate.port)) for _ in range(300)]
        try:
            with anyio.fail_after(30):
                answer = await exchange(gate.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        finally:
            for sock in idle:
                sock.close()
        started = [json.loads(line) for line in gate.log_text().splitlines() if '"gate_fd_limit"' in line]
    assert status_of(answer) == 200, answer[:200]
    assert started and started[0]["before"] == 128 and started[0]["now"] == 4096, started


async def test_past_the_connections_the_fds_allow_the_oldest_idle_ones_go_first(fake_engine: FakeEngine,
                                                                                tmp_path: Path) -> None:
    """A hard limit of 128 descriptors: ``max_connections`` is lowered to fit it, and 150 idle connections
    (more than the process could accept) cost the attacker its oldest ones instead of resetting real clients."""
    with gate_process(tmp_path, fake_engine.url, preexec_fn=_nofile(128, 128)) as gate:
        idle = [socket.create_connection(("127.0.0.1", gate.port)) for _ in range(150)]
        try:
            with anyio.fail_after(30):
                answer = await exchange(gate.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                open_now = [await anyio.to_thread.run_sync(_still_open, sock) for sock in idle]
                shed = await gate.limit_count("max_connections")
        finally:
            for sock in idle:
                sock.close()
        started = [json.loads(line) for line in gate.log_text().splitlines() if '"gate_fd_limit"' in line]
    assert status_of(answer) == 200, answer[:200]
    fitted = started[0]["max_connections"]
    assert fitted == (128 - 64) // 2, started
    assert not any(open_now[:100]) and all(open_now[-(fitted - 2):]), open_now  # oldest first
    assert shed >= 150 + 1 - fitted


async def test_with_every_connection_busy_a_new_one_gets_503_and_a_retry_after(fake_engine: FakeEngine,
                                                                                tmp_path: Path) -> None:
    """Nothing idle to close: the connection past ``max_connections`` is told so, and those at work carry on."""
    with gate_process(tmp_path, fake_engine.url, "max_connections = 3") as gate, anyio.fail_after(60):
        streams = [await anyio.connect_tcp("127.0.0.1", gate.port) for _ in range(3)]
        for stream in streams:
            await stream.send(post(CHAT, chat_body(stream=True, max_tokens=3, x_hold_after=1), close=True))
        while fake_engine.holding < 3:
            await anyio.sleep(0.02)
        refused = await exchange(gate.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        fake_engine.release.set()
        answers = [(await closed_within(stream, 20))[1] for stream in streams]
        for stream in streams:
            await stream.aclose()
        counted = await gate.limit_count("max_connections")
    assert status_of(refused) == 503 and b"retry-after: 1" in refused, refused
    assert json.loads(refused.partition(b"\r\n\r\n")[2])["error"]["type"] == "unavailable"
    assert all(b"data: [DONE]" in answer for answer in answers)
    assert counted == 1


async def test_a_body_pipelined_behind_a_stream_waits_unread(fake_engine: FakeEngine, tmp_path: Path) -> None:
    """nginx reads a pipelined request only after the one before; the gate read a 300 MiB body queued behind a
    held stream at once (RSS +300 MiB). Now it reads ``read_ahead`` bytes, then pauses until its turn."""
    total = 160 * MiB
    with gate_process(tmp_path, fake_engine.url) as gate:
        with anyio.fail_after(90):
            await healthy(gate)
            gate.reset_peak()
            base = gate.rss_kib("VmRSS")
            sent = 0
            got = b""
            async with await anyio.connect_tcp("127.0.0.1", gate.port) as stream:
                await stream.send(post(CHAT, chat_body(stream=True, max_tokens=3, x_hold_after=1)))
                while fake_engine.holding < 1:
                    await anyio.sleep(0.02)

                async def push() -> None:
                    nonlocal sent
                    await stream.send(post(CHAT, b"", length=total))
                    block = b" " * MiB
                    try:
                        while sent < total:
                            await stream.send(block)
                            sent += len(block)
                    except (anyio.BrokenResourceError, OSError):
                        pass

                async with anyio.create_task_group() as tg:
                    tg.start_soon(push)
                    last, still_since = -1, time.monotonic()
                    while time.monotonic() - still_since < 1.0 and sent < total:  # until the sender is stuck
                        if sent != last:
                            last, still_since = sent, time.monotonic()
                        await anyio.sleep(0.1)
                    stuck_at = sent
                    peak = gate.rss_kib("VmHWM")
                    fake_engine.release.set()
                    closed, got = await closed_within(stream, 20)
                    tg.cancel_scope.cancel()
            paused = await gate.limit_count("read_ahead")
            await healthy(gate)
    print(f"sender stuck at {stuck_at / MiB:.0f} MiB; gate RSS {base / 1024:.0f} MiB, peak +{(peak - base) / 1024:.0f}")
    assert stuck_at < total and (peak - base) / 1024 < 64, (stuck_at, peak - base)
    assert b"data: [DONE]" in got and b"HTTP/1.1 413" in got  # its turn came: over max_body
    assert paused >= 1


async def test_bodies_that_never_end_are_bounded_by_body_memory_and_timed_out(fake_engine: FakeEngine,
                                                                             tmp_path: Path) -> None:
    """Six 60 MiB bodies, each one byte short, held 360 MiB for good. With ``body_memory`` (16 MiB here) the
    bodies that do not fit get 503 + Retry-After at once, and the stalled ones 408 after ``body_timeout``."""
    limits = f"max_body = {8 * MiB}\nbody_memory = {16 * MiB}\nbody_timeout = 2.0\n"
    size = 7 * MiB
    with gate_process(tmp_path, fake_engine.url, limits) as gate:
        with anyio.fail_after(90):
            await healthy(gate)
            gate.reset_peak()
            base = gate.rss_kib("VmRSS")
            answers: list[bytes] = []
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    stream = await anyio.connect_tcp("127.0.0.1", gate.port)
                    await stream.send(post(CHAT, b" " * (size - 1), length=size))

                    async def answer(s: anyio.abc.SocketStream = stream) -> None:
                        async with s:
                            answers.append((await closed_within(s, 20))[1])

                    tg.start_soon(answer)
            peak = gate.rss_kib("VmHWM")
            counts = {limit: await gate.limit_count(limit) for limit in ("body_memory", "body_timeout")}
            results = {r: await gate.request_count("chat", r) for r in ("body_memory", "body_timeout")}
            await healthy(gate)
    statuses = sorted(status_of(a) or 0 for a in answers)
    assert statuses == [408, 408, 503, 503, 503, 503], [a[:200] for a in answers]
    assert all(b"retry-after: " in a for a in answers if status_of(a) == 503)
    assert (peak - base) / 1024 < 16 + 32, peak - base
    assert counts == {"body_memory": 4, "body_timeout": 2} and results == counts


async def test_requests_the_gate_does_not_take_never_reach_the_engine(tmp_path: Path) -> None:
    """A GET/HEAD body (an engine that ignores it runs it as a second, hidden request past the path policy),
    heads over the limits however they arrive, another HTTP version, no Host or two, an unknown coding."""
    smuggled = b"POST /slots/0?action=erase HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    cases = {
        "GET with a body": (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                            + smuggled, 400),
        "HEAD with a body": (b"HEAD /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                             % (len(smuggled), smuggled), 400),
        "10,000 headers in one read": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n", 431),
        "a 70 KB header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        "101 headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431),
        "no Host": (b"GET /health HTTP/1.1\r\n\r\n", 400),
        "two Hosts": (b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        "TE: gzip, chunked": (b"POST " + CHAT + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                              b"2\r\n{}\r\n0\r\n\r\n", 501),
        "HTTP/2.0 request line": (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        "HTTP/0.9 request line": (b"GET /health HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    }
    async with quirky_engine() as engine:
        with gate_process(tmp_path, engine.url) as gate, anyio.fail_after(60):
            seen = {name: status_of(await exchange(gate.port, data, timeout=5)) for name, (data, _) in cases.items()}
            counts = {limit: await gate.limit_count(limit) for limit in ("max_headers", "max_head", "invalid_http")}
            fine = await exchange(gate.port, b"GET /health HTTP/1.0\r\n\r\n")  # 1.0 needs no Host
    assert seen == {name: status for name, (_, status) in cases.items()}, seen
    assert [s.target for s in engine.seen] == ["/health"]  # only the last, good one
    assert status_of(fine) == 200
    assert counts == {"max_headers": 2, "max_head": 1, "invalid_http": 7}, counts
