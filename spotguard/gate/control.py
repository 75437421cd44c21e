"""The gate's control socket: the narrow API through which the daemon drives the gate process.

Newline-delimited JSON over a Unix socket (``[gate] control_socket``, mode 0600: only the gate's own
user, which is the daemon's): one request object per line, one answer per line, any number of them per
connection. Every answer has ``"ok"``; a refused request has ``"error"`` instead of its fields. The
values on the wire are ``gate/protocol.py``'s, shared by both sides.

    {"op": "hello"}                       -> pid, version, listen, upstream, started_at, holding
    {"op": "stats"}                       -> holding, inflight, requests [[endpoint, result, count], ...], seams,
                                             limits [[limit, count], ...]
    {"op": "declare", "state": {...}}     -> holding   (DesiredState in, HeldState out: what the gate now holds)
    {"op": "journal"}                     -> requests [entry, ...]   (JournalEntry: output so far)
    {"op": "interrupt", "seconds": s}     -> requests [entry, ...]   (continued on peers or cut; final)
    {"op": "release", "ids": [...]}       -> released
    {"op": "stop"}                        -> stopping                (as on SIGTERM)

Entries carry the request body (base64) and the output so far: user data, sent only to the daemon over
this socket and never logged here.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from spotguard import __version__
from spotguard.config import Config
from spotguard.errors import GateError
from spotguard.gate.protocol import DesiredState, HeldState, JournalEntry
from spotguard.notice import rfc3339

MAX_LINE = 1 << 30
"""Largest answer line (a journal of many long contexts); requests are tiny."""
SOCKET_MODE = 0o600


def control_path(config: Config) -> str:
    """``[gate] control_socket``, or gate.sock beside the daemon's control socket."""
    return config.gate.control_socket or str(Path(config.control.socket).with_name("gate.sock"))


# -- the gate's side -------------------------------------------------------------------------------

class ControlledGate(Protocol):
    """What the control socket needs of the data plane (``proxy.Gate``)."""

    @property
    def draining(self) -> bool: ...

    @property
    def state(self) -> DesiredState: ...

    @property
    def inflight(self) -> int: ...

    def apply(self, state: DesiredState) -> HeldState: ...

    def held(self) -> HeldState: ...

    def journal_entries(self) -> list[JournalEntry]: ...

    def interrupt_all(self) -> list[JournalEntry]: ...

    def release(self, request_ids: Sequence[str]) -> int: ...

    def migration_stats(self) -> dict[str, Any]: ...

    def request_counts(self) -> list[tuple[str, str, int]]: ...

    def limit_counts(self) -> list[tuple[str, int]]: ...


class GateControl:
    """Answers the daemon's requests for one gate process."""

    def __init__(self, gate: ControlledGate, *, listen: str, upstream: str, stop: Callable[[], None],
                 log: structlog.stdlib.BoundLogger) -> None:
        self._gate = gate
        self._hello = {"pid": os.getpid(), "version": __version__, "listen": listen, "upstream": upstream,
                       "started_at": rfc3339(datetime.now().astimezone())}
        self._stop = stop
        self._log = log

    def _declare(self, state: DesiredState) -> dict[str, Any]:
        gate = self._gate
        before = gate.state
        held = gate.apply(state)
        if (before.draining, before.vm_deadline) != (state.draining, state.vm_deadline):
            self._log.info("gate_draining" if state.draining else "gate_accepting", inflight=gate.inflight,
                           generation=state.generation,
                           vm_deadline=rfc3339(state.vm_deadline) if state.vm_deadline else None)
        return {"holding": held.to_wire()}

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        gate = self._gate
        if op == "hello":
            return {**self._hello, "holding": gate.held().to_wire(), "inflight": gate.inflight}
        if op == "stats":
            return {"holding": gate.held().to_wire(), "inflight": gate.inflight,
                    "requests": [list(row) for row in gate.request_counts()],
                    "limits": [list(row) for row in gate.limit_counts()], **gate.migration_stats()}
        if op == "declare":
            return self._declare(DesiredState.from_wire(request.get("state")))
        if op == "draining":  # from a daemon older than the declared state (an upgrade restarts the daemon first)
            on = request.get("on")
            if not isinstance(on, bool):
                raise GateError("draining: 'on' must be true or false")
            deadline = request.get("deadline")
            vm = DesiredState.from_wire({"generation": 0, "draining": on, "vm_deadline": deadline}).vm_deadline
            return self._declare(DesiredState(generation=0, draining=on, vm_deadline=vm if on else None))
        if op == "journal":
            return {"requests": [e.to_wire() for e in gate.journal_entries()]}
        if op == "interrupt":
            timeout = request.get("seconds")
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 600:
                raise GateError("interrupt: 'seconds' must be a number between 0 and 600")
            cut = gate.interrupt_all()  # each request is final when this returns: no waiting needed
            self._log.info("gate_interrupted", requests=len(cut))
            return {"requests": [e.to_wire() for e in cut]}
        if op == "release":
            ids = request.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise GateError("release: 'ids' must be a list of request ids")
            return {"released": gate.release(ids)}
        if op == "stop":
            self._log.info("gate_stop_requested")
            return {"stopping": True}  # handle() stops the gate once this answer is sent
        raise GateError(f"unknown op {op!r}")

    async def handle(self, stream: SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            while True:
                try:
                    line = await reader.receive_until(b"\n", MAX_LINE)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise GateError("a request must be a JSON object")
                    answer = {"ok": True, **await self.answer(request)}
                except (ValueError, GateError) as exc:
                    answer = {"ok": False, "error": str(exc)}
                try:
                    await stream.send(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return
                finally:
                    if answer.get("stopping"):
                        self._stop()


def listen_unix(path: str) -> socket.socket:
    """The control socket, created 0600 from the start; a live gate's socket is never taken over."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(path):
            if _answers(path):
                raise GateError(f"a gate is already running on {path} ([gate] control_socket)")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        sock.listen(16)
    except OSError as exc:
        raise GateError(f"cannot create the gate's control socket {path}: {exc}; set [gate] control_socket "
                        "to a writable path") from exc
    return sock


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


async def serve_control(control: GateControl, path: str, sock: socket.socket | None = None, *,
                        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket (``sock``, else a new one at ``path``) until cancelled; the file is
    removed on the way out."""
    from anyio.abc import SocketListener

    listener = await SocketListener.from_socket(sock if sock is not None else listen_unix(path))
    inode = os.stat(path).st_ino
    try:
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            await listener.serve(control.handle, task_group=tg)
    finally:
        try:
            if os.stat(path).st_ino == inode:  # not a newer gate's socket
                os.unlink(path)
        except OSError:
            pass


# -- the daemon's side -----------------------------------------------------------------------------

class GateConnection:
    """One connection to the gate's control socket; requests on it are answered in order."""

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: str, timeout: float = 2.0) -> GateConnection:
        try:
            with anyio.fail_after(timeout):
                return cls(await anyio.connect_unix(path))
        except (OSError, TimeoutError) as exc:
            raise GateError(f"no gate answers on {path}: {exc or 'timeout'}") from None

    async def request(self, op: str, *, timeout: float, **args: Any) -> dict[str, Any]:
        """Send one request; raises GateError when the gate is gone, times out or refuses it."""
        async with self._lock:
            try:
                with anyio.fail_after(timeout):
                    await self._stream.send(json.dumps({"op": op, **args}).encode() + b"\n")
                    line = await self._reader.receive_until(b"\n", MAX_LINE)
            except TimeoutError:
                raise GateError(f"the gate did not answer {op!r} within {timeout:.1f}s") from None
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError) as exc:
                raise GateError(f"the gate closed its control connection ({type(exc).__name__})") from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise GateError(f"the gate's answer to {op!r} is not JSON") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise GateError(f"the gate refused {op!r}: {error or 'no reason given'}")
        return answer

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()


async def call(path: str, op: str, *, timeout: float, **args: Any) -> dict[str, Any]:
    """One request on a connection of its own."""
    connection = await GateConnection.open(path, min(timeout, 2.0))
    try:
        return await connection.request(op, timeout=timeout, **args)
    finally:
        await connection.aclose()
