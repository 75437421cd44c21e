"""Kept-alive connections from the gate to the engine.

The most recently used idle connection is taken first (its TCP state and the engine's buffers are
warm). Idle ones are dropped after ``keepalive`` seconds, before the engine's own keep-alive timeout
(5 s in llama.cpp and uvicorn), so a connection is not closed under a request we are sending on it;
when that still happens the exchange retries once on a new connection (``UpstreamConnection.reused``).
A connection whose request was not written whole, or whose answer was not read whole, is never kept
(``UpstreamConnection.reusable``): nginx does not keep engine connections alive at all by default.
"""

from __future__ import annotations

import asyncio
import ssl

from spotguard.gate.http1 import UpstreamConnection

KEEPALIVE = 4.0
"""Seconds an idle connection to the engine is kept."""
MAX_IDLE = 256
"""Idle connections kept at most; more are closed when released."""


class UpstreamPool:
    def __init__(self, *, host: str, port: int, tls: ssl.SSLContext | None, connect_timeout: float,
                 keepalive: float = KEEPALIVE) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._idle: list[UpstreamConnection] = []
        self._sweep: asyncio.TimerHandle | None = None

    def take(self, now: float) -> UpstreamConnection | None:
        """A live idle connection, or None (then ``connect``)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive:
                connection.reused = True
                return connection
            connection.abort()
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(self._forget), self._host, self._port, ssl=self._tls,
                                   server_hostname=self._host if self._tls is not None else None),
            self._connect_timeout)
        return connection

    def give_back(self, connection: UpstreamConnection, now: float) -> None:
        """Keep ``connection`` for the next request, if nothing of the last one is left on it; else close it."""
        if not connection.reusable:
            connection.abort()
            return
        connection.idle_since = now
        self._idle.append(connection)
        if len(self._idle) > MAX_IDLE:
            self._idle.pop(0).abort()
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._expire)

    def _forget(self, connection: UpstreamConnection) -> None:
        """An idle connection closed by the engine."""
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def _expire(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        keep: list[UpstreamConnection] = []
        for connection in self._idle:
            if not connection.closed and now - connection.idle_since < self._keepalive:
                keep.append(connection)
            else:
                connection.abort()
        self._idle = keep
        if keep:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive / 2, self._expire)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in self._idle:
            connection.abort()
        self._idle = []
