"""``spotguard gate`` as a real process on loopback, and raw-socket helpers to talk to it as a client would
(including the clients a proxy must survive: slow, silent, oversized, malformed)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from spotguard.gate.control import call
from tests.support._processes import stop
from tests.support.moto import free_port

SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))
START_TIMEOUT = 30.0
"""Python start-up on a busy 2-core machine; a healthy gate listens well within a second."""


@dataclass(frozen=True)
class GateProcess:
    url: str
    port: int
    pid: int
    """The gate process's (``proc`` is the process the test started: the gate, or a daemon that started it)."""
    proc: subprocess.Popen[bytes]
    log: Path
    control: str
    """The gate's control socket (stats, draining, interrupt)."""

    def rss_kib(self, field: str = "VmHWM") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for pid {self.pid}")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := current RSS

    async def stats(self) -> dict[str, Any]:
        return await call(self.control, "stats", timeout=5)

    async def limit_count(self, limit: str) -> int:
        return sum(int(n) for name, n in (await self.stats())["limits"] if name == limit)

    async def request_count(self, endpoint: str, result: str) -> int:
        return sum(int(n) for e, r, n in (await self.stats())["requests"] if (e, r) == (endpoint, result))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def gate_process(tmp: Path, upstream: str, gate: str = "", *, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None, name: str = "gate",
                 control: str = "") -> Iterator[GateProcess]:
    """Start ``spotguard gate`` in front of ``upstream``; ``gate`` is more ``[gate]`` TOML (limits, peers)."""
    port = free_port()
    base = tmp / name
    base.mkdir(parents=True, exist_ok=True)
    config = base / "spotguard.toml"
    control = control or str(base / "gate.sock")
    config.write_text(f"""
[agent]
cloud = "none"
state_dir = "{base}/state"
log_format = "json"
[control]
socket = "{base}/control.sock"
[gate]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
control_socket = "{control}"
{gate}
""")
    log = base / "gate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([SPOTGUARD, "gate", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=preexec_fn)  # noqa: PLW1509 - rlimits/umask of the child only
    try:
        wait_listening(port, proc, log)
        yield GateProcess(f"http://127.0.0.1:{port}", port, proc.pid, proc, log, control)
    finally:
        stop(proc)


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until something accepts on ``port``; RuntimeError (with the log) when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gate did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.05)  # bounded by the deadline above: process start-up, not a test wait


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


async def exchange(port: int, data: bytes, *, body_stream: int = 0, timeout: float = 10) -> bytes:
    """Send ``data`` (then ``body_stream`` more bytes of body, in 1 MiB writes, while the gate still reads)
    and return whatever comes back until the gate closes or ``timeout`` seconds pass."""
    answer = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        try:
            await stream.send(data)
            block = b"x" * (1 << 20)
            sent = 0
            with anyio.move_on_after(20):
                while sent < body_stream:
                    await stream.send(block)
                    sent += len(block)
        except (anyio.BrokenResourceError, OSError):
            pass  # the gate stopped reading and closed: an answer may still be waiting
        with anyio.move_on_after(timeout):
            while True:
                try:
                    answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
    return answer


async def closed_within(stream: anyio.abc.SocketStream, seconds: float) -> tuple[bool, bytes]:
    """Read until the peer closes (True) or ``seconds`` pass (False); what arrived meanwhile."""
    got = b""
    with anyio.move_on_after(seconds):
        while True:
            try:
                got += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return True, got
    return False, got


async def read_response(stream: anyio.abc.SocketStream, timeout: float = 10) -> bytes:
    """One whole answer with a content-length (head and body) from ``stream``; b"" if none came in time."""
    data = b""
    with anyio.move_on_after(timeout):
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                               if line.lower().startswith(b"content-length:")), 0)
                if len(rest) >= length:
                    return data
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return data
    return data
