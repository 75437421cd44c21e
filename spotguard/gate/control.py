"""The gate's control socket: the narrow API through which the daemon drives the gate process.

Newline-delimited JSON over a Unix socket (``[gate] control_socket``, mode 0600: only the gate's own
user, which is the daemon's): one request object per line, one answer per line, any number of them per
connection. Every answer has ``"ok"``; a refused request has ``"error"`` instead of its fields.

    {"op": "hello"}                   -> pid, version, listen, upstream, started_at, draining, inflight
    {"op": "stats"}                   -> draining, inflight, requests [[endpoint, result, count], ...],
                                         limits [[limit, count], ...]
    {"op": "draining", "on": bool, "deadline": t|null} -> draining  (t: Unix time the VM goes away)
    {"op": "journal"}                 -> requests [entry, ...]   (in flight, output so far)
    {"op": "interrupt", "seconds": s} -> requests [entry, ...]   (cut, settled within timeout)
    {"op": "release", "ids": [...]}   -> released
    {"op": "stop"}                    -> stopping                (as on SIGTERM)

Entries carry the request body (base64) and the output so far: user data, sent only to the daemon over
this socket and never logged here.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Callable
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
from spotguard.gate.journal import InflightRequest, Journal
from spotguard.notice import rfc3339

MAX_LINE = 1 << 30
"""Largest answer line (a journal of many long contexts); requests are tiny."""
SOCKET_MODE = 0o600


def control_path(config: Config) -> str:
    """``[gate] control_socket``, or gate.sock beside the daemon's control socket."""
    return config.gate.control_socket or str(Path(config.control.socket).with_name("gate.sock"))


# -- entries on the wire ---------------------------------------------------------------------------

def entry_to_wire(entry: InflightRequest) -> dict[str, Any]:
    return {"id": entry.id, "endpoint": entry.endpoint, "model": entry.model,
            "body": base64.b64encode(entry.body).decode(), "stream": entry.stream,
            "started_at": rfc3339(entry.started_at), "output": entry.output,
            "finish_reason": entry.finish_reason, "slot_id": entry.slot_id,
            "interrupted": entry.interrupted.is_set(), "settled": entry.settled.is_set(),
            "migrated_to": entry.migrated_to}


def entry_from_wire(doc: dict[str, Any]) -> InflightRequest:
    """An entry as the daemon sees it: a copy, whose events say what the gate had done at that moment."""
    try:
        entry = InflightRequest(
            id=str(doc["id"]), endpoint=str(doc["endpoint"]), model=str(doc["model"]),
            body=base64.b64decode(doc["body"]), stream=bool(doc["stream"]),
            started_at=datetime.fromisoformat(str(doc["started_at"]).replace("Z", "+00:00")),
            output=[str(part) for part in doc["output"]], finish_reason=doc.get("finish_reason"),
            slot_id=doc["slot_id"] if isinstance(doc.get("slot_id"), int) else None,
            migrated_to=str(doc.get("migrated_to") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise GateError(f"the gate sent a journal entry that cannot be read: {type(exc).__name__}: {exc}") from None
    if doc.get("interrupted"):
        entry.interrupted.set()
    if doc.get("settled"):
        entry.settled.set()
    return entry


# -- the gate's side -------------------------------------------------------------------------------

class ControlledGate(Protocol):
    """What the control socket needs of the data plane (``proxy.Gate``)."""

    @property
    def draining(self) -> bool: ...

    def set_draining(self, draining: bool) -> None: ...

    def set_node_deadline(self, at: float | None) -> None: ...

    def migration_stats(self) -> dict[str, Any]: ...

    def request_counts(self) -> list[tuple[str, str, int]]: ...

    def limit_counts(self) -> list[tuple[str, int]]: ...


class GateControl:
    """Answers the daemon's requests for one gate process."""

    def __init__(self, gate: ControlledGate, journal: Journal, *, listen: str, upstream: str,
                 stop: Callable[[], None], log: structlog.stdlib.BoundLogger) -> None:
        self._gate = gate
        self._journal = journal
        self._hello = {"pid": os.getpid(), "version": __version__, "listen": listen, "upstream": upstream,
                       "started_at": rfc3339(datetime.now().astimezone())}
        self._stop = stop
        self._log = log

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        gate, journal = self._gate, self._journal
        if op == "hello":
            return {**self._hello, "draining": gate.draining, "inflight": len(journal)}
        if op == "stats":
            return {"draining": gate.draining, "inflight": len(journal),
                    "requests": [list(row) for row in gate.request_counts()],
                    "limits": [list(row) for row in gate.limit_counts()], **gate.migration_stats()}
        if op == "draining":
            on = request.get("on")
            if not isinstance(on, bool):
                raise GateError("draining: 'on' must be true or false")
            if on != gate.draining:
                self._log.info("gate_draining" if on else "gate_accepting", inflight=len(journal))
            deadline = request.get("deadline")
            if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
                raise GateError("draining: 'deadline' must be a Unix time or null")
            gate.set_draining(on)
            gate.set_node_deadline(float(deadline) if deadline is not None and on else None)
            return {"draining": gate.draining}
        if op == "journal":
            return {"requests": [entry_to_wire(e) for e in journal.active()]}
        if op == "interrupt":
            timeout = request.get("seconds")
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 600:
                raise GateError("interrupt: 'seconds' must be a number between 0 and 600")
            cut = await journal.interrupt_and_wait(float(timeout))
            self._log.info("gate_interrupted", requests=len(cut))
            return {"requests": [entry_to_wire(e) for e in cut]}
        if op == "release":
            ids = request.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise GateError("release: 'ids' must be a list of request ids")
            await journal.release(ids)
            return {"released": len(ids)}
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
