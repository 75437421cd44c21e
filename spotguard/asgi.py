"""Serving plain ASGI apps with uvicorn inside an anyio task group, on TCP or a Unix socket."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Bound:
    """Where a server ended up listening (port 0 resolves to the real port)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, else Nagle adds ~40 ms a reply.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def unix_socket(path: str, mode: int) -> socket.socket:
    """A listening Unix socket created with ``mode`` from the start (no window with wider bits)."""
    if os.path.exists(path) or os.path.islink(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _config(app: ASGIApp) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
        server_header=False,
        date_header=False,
    )


class _Server(uvicorn.Server):
    """Signals belong to the daemon's runner, not to each listener (uvicorn would stop on SIGTERM)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit = anyio.Event()

    async def main_loop(self) -> None:
        # uvicorn's own loop wakes ten times a second per listener to look at should_exit and to refresh the
        # Date header we do not send; on an idle daemon with two listeners that was most of its CPU
        # (bench/detect.py, cloud = none: 0.40% of a core). Wait for request_exit() instead.
        await self._exit.wait()

    def request_exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(app: ASGIApp, sock: socket.socket, *, task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on an already bound socket until cancelled; reports the bound address."""
    server = _Server(_config(app))
    name = sock.getsockname()
    bound = Bound(str(name[0]), int(name[1])) if isinstance(name, tuple) else Bound(str(name), 0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.005)
        task_status.started(bound)
        try:
            await anyio.sleep_forever()
        finally:
            server.request_exit()


async def serve_tcp(app: ASGIApp, host: str, port: int, *,
                    task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    # No ``with sock``: uvicorn closes the listening socket's descriptor on shutdown, and closing it
    # again here could close whatever descriptor reused that number meanwhile.
    sock = tcp_socket(host, port)
    await serve(app, sock, task_status=task_status)


async def read_body(receive: Receive, limit: int = 1 << 20) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueError(f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes | str = b"", *,
                  content_type: str = "text/plain; charset=utf-8",
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = body.encode() if isinstance(body, str) else body
    all_headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(payload)).encode())]
    all_headers.extend(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": payload})


def query_params(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    raw = scope.get("query_string", b"")
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


def header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in scope.get("headers", []):
        if key.lower() == wanted:
            return bytes(value).decode("latin-1")
    return None
