"""The gate's listening socket and its serving loop (``spotguard gate``, and the tests' in-process gates)."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from spotguard.asgi import Bound
from spotguard.config import parse_listen
from spotguard.errors import GateError
from spotguard.gate.http1 import ClientConnection

if TYPE_CHECKING:
    from spotguard.gate.proxy import Gate


def nodelay_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose accepted connections have Nagle off (Linux copies the option to them);
    without it a client that writes headers and body separately waits ~40 ms for delayed ACKs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def listen_socket(listen: str) -> socket.socket:
    """The gate's listening socket for ``[gate] listen``; a clear GateError when it cannot be had."""
    host, port = parse_listen(listen, "[gate] listen")
    try:
        return nodelay_socket(host, port)
    except OSError as exc:
        raise GateError(f"the gate cannot listen on {listen} ([gate] listen): {exc.strerror or exc}") from None


async def run_gate(gate: Gate, listen: str, sock: socket.socket | None = None, *,
                   task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``gate`` on ``sock`` (else a new socket for ``listen``) until cancelled, then close it."""
    if sock is None:
        sock = listen_socket(listen)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(lambda: ClientConnection(gate, gate.connections), sock=sock, backlog=2048)
        gate.listening(server)
        name = sock.getsockname()
        task_status.started(Bound(str(name[0]), int(name[1])))
        await anyio.sleep_forever()
    finally:
        await gate.aclose()
