"""sd_notify datagrams arrive on a real Unix datagram socket, by file path and by abstract name."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from spotguard import sdnotify


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    with sock:
        yield sock, address


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"spotguard-test-{uuid.uuid4().hex}"
    sock.bind(b"\0" + name.encode())
    with sock:
        yield sock, "@" + name


async def receive(sock: socket.socket) -> str:
    # A bounded blocking read in a worker thread: works on every anyio the project allows
    # (anyio.wait_readable needs 4.7) and leaves the event loop free for keep_alive.
    sock.settimeout(5)
    data: bytes = await anyio.to_thread.run_sync(sock.recv, 4096)
    return data.decode()


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["path_socket", "abstract_socket"])
async def test_ready_stopping_watchdog_status_arrive(which: str, request: pytest.FixtureRequest) -> None:
    sock, address = request.getfixturevalue(which)
    env = {"NOTIFY_SOCKET": address}
    assert sdnotify.ready("watching aws", environ=env)
    assert await receive(sock) == "READY=1\nSTATUS=watching aws"
    assert sdnotify.watchdog(environ=env)
    assert await receive(sock) == "WATCHDOG=1"
    assert sdnotify.status("draining\n3 requests", environ=env)
    assert await receive(sock) == "STATUS=draining 3 requests"
    assert sdnotify.stopping(environ=env)
    assert await receive(sock) == "STOPPING=1"


def test_no_socket_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert sdnotify.ready(environ={}) is False
    assert sdnotify.watchdog(environ={"NOTIFY_SOCKET": ""}) is False
    # A socket that vanished (manager gone) must not raise into the daemon.
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


@pytest.mark.anyio
async def test_keep_alive_feeds_the_watchdog(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"}  # every 20 ms
    async with anyio.create_task_group() as tg:
        tg.start_soon(sdnotify.keep_alive, env)
        for _ in range(3):
            assert await receive(sock) == "WATCHDOG=1"
        tg.cancel_scope.cancel()
    with anyio.fail_after(1):
        await sdnotify.keep_alive({})  # no watchdog configured: returns at once
