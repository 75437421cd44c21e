"""The demo's helper processes: started in sessions of their own (so Ctrl-C reaches only the demo, which
then stops them in order), logged to files, and always stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

STOP_WAIT = 5.0
"""Seconds a process gets after SIGTERM before SIGKILL."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Processes:
    """Every process the demo started (and the gate, which the daemon starts in a session of its own)."""

    logs: Path
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    foreign: list[tuple[str, int]] = field(default_factory=list)

    def start(self, name: str, args: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` with stdout and stderr in ``logs/NAME.log``."""
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                                    env=env, start_new_session=True)
        self.children.append((name, proc))
        return proc

    def adopt(self, name: str, pid: int) -> None:
        """Stop ``pid`` at the end too (a process someone else started for us)."""
        self.foreign.append((name, pid))

    def stop(self, name: str) -> None:
        for child_name, proc in self.children:
            if child_name == name:
                _stop_child(proc)

    def running(self, name: str) -> bool:
        return any(child_name == name and proc.poll() is None for child_name, proc in self.children)

    def stop_all(self) -> list[str]:
        """SIGTERM every child, newest first, then the adopted processes; SIGKILL what is still there after
        STOP_WAIT. Returns what needed SIGKILL."""
        killed: list[str] = []
        # Children first (the daemon was started last, so it goes first: a live daemon would start its
        # gate again), then what they started.
        for name, proc in reversed(self.children):
            if not _stop_child(proc):
                killed.append(name)
        for name, pid in reversed(self.foreign):
            if not _stop_pid(pid):
                killed.append(name)
        return killed


def _stop_child(proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout=STOP_WAIT)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_WAIT)
        return False


def _stop_pid(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # bounded by the deadline: waiting for a process to exit
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return False


async def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path, *, timeout: float = 60.0,
                    want: int | None = 200) -> None:
    """Wait until ``url`` answers (``want``, or anything when None); fail with the log's path if the process
    exits or the time runs out."""
    async with httpx.AsyncClient(timeout=2) as http:
        with anyio.move_on_after(timeout):
            while proc.poll() is None:
                try:
                    response = await http.get(url)
                    if want is None or response.status_code == want:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)  # process start-up, bounded by the timeout
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f}s"
    raise RuntimeError(f"{what} {state}; see {log}")
