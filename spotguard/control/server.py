"""The control socket's server: a plain ASGI app served by uvicorn on a Unix socket."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from spotguard.asgi import ASGIApp, Bound, Receive, Scope, Send, read_body, respond, serve, unix_socket
from spotguard.config import ControlConfig
from spotguard.control.controller import (
    ControlBadRequest,
    ControlConflict,
    Controller,
    DrainRequest,
    UndrainRequest,
    live_cloud_notice,
)
from spotguard.errors import ConfigError, ControlError, SpotguardError
from spotguard.metrics import Metrics

BODY_LIMIT = 64 * 1024
CALL_TIMEOUT = 10.0
"""Seconds a controller call may take; a manual drain starts in the background and answers at once."""
ROUTES = {"/drain": "POST", "/undrain": "POST", "/status": "GET"}


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def control_app(controller: Controller, *, log: structlog.stdlib.BoundLogger, metrics: Metrics) -> ASGIApp:
    """The ASGI app behind the control socket."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; nothing else is spoken on this socket
        method, path = scope["method"], scope["path"]
        try:
            doc = await _route(controller, method, path, receive)
            status = 200
        except _HttpError as exc:
            status, doc = exc.status, {"error": str(exc)}
        except ControlConflict as exc:
            status, doc = 409, {"error": str(exc)}
        except ControlBadRequest as exc:
            status, doc = 400, {"error": str(exc)}
        except ControlError as exc:
            status, doc = 422, {"error": str(exc)}
        except TimeoutError:
            status, doc = 504, {"error": f"the daemon did not answer within {CALL_TIMEOUT:.0f}s"}
        except SpotguardError as exc:
            status, doc = 500, {"error": str(exc)}
        except Exception as exc:  # a bug must answer the operator, not kill the socket
            log.exception("control request failed", method=method, path=path)
            metrics.config_errors.labels(component="control", reason="internal").inc()
            status, doc = 500, {"error": f"internal error ({type(exc).__name__}); see the daemon log"}
        if status >= 400:
            metrics.config_errors.labels(component="control", reason=f"http_{status}").inc()
        # status is polled by scripts; the requests that change something are worth a line each
        (log.debug if path == "/status" and status == 200 else log.info)(
            "control request", method=method, path=path, status=status)
        await respond(send, status, json.dumps(doc, default=str), content_type="application/json")

    return app


async def _route(controller: Controller, method: str, path: str, receive: Receive) -> dict[str, Any]:
    allowed = ROUTES.get(path)
    if allowed is None:
        raise _HttpError(404, f"no such endpoint {path}; use {', '.join(f'{m} {p}' for p, m in ROUTES.items())}")
    if method != allowed:
        raise _HttpError(405, f"{path} takes {allowed}, not {method}")
    if path == "/status":
        return controller.status()
    data = await _json_body(receive)
    with anyio.fail_after(CALL_TIMEOUT):
        if path == "/drain":
            drain = DrainRequest.parse(data)
            return await controller.manual_drain(drain.reason, drain.deadline_seconds, drain.dry_run)
        undrain = UndrainRequest.parse(data)
        notice = live_cloud_notice(controller.status())
        if notice is not None and not undrain.force:
            raise ControlConflict(
                f"refusing to undrain: a {notice.get('source')} {notice.get('kind')} notice is live "
                f"(deadline {notice.get('deadline')}); the platform is taking this VM away. "
                "Undrain with --force to serve again anyway.")
        return await controller.undrain(undrain.force)


async def _json_body(receive: Receive) -> object:
    try:
        raw = await read_body(receive, BODY_LIMIT)
    except ValueError:
        raise _HttpError(413, f"request body larger than {BODY_LIMIT} bytes") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlBadRequest(f"the body is not JSON: {exc}") from None


def _group_id(config: ControlConfig) -> int | None:
    if not config.group:
        return None
    try:
        return grp.getgrnam(config.group).gr_gid
    except KeyError:
        raise ConfigError(f"[control] group: there is no group named {config.group!r} on this host") from None


def _refuse_if_live(path: str) -> None:
    """Never steal the socket of a daemon that is still running; a stale file is replaced."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return  # refused or not a socket: nobody is listening there
    finally:
        probe.close()
    raise ControlError(f"another spotguard is already listening on {path} ([control] socket)")


def open_socket(config: ControlConfig) -> socket.socket:
    """The listening control socket: parent made 0755 if missing, ``mode`` bits, ``group`` ownership."""
    path = config.socket
    mode = int(config.mode, 8)
    gid = _group_id(config)
    parent = Path(path).parent
    try:
        if not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)
            parent.chmod(0o755)  # mkdir's mode is cut by the umask; operators must reach the socket
        _refuse_if_live(path)
        sock = unix_socket(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:
        raise ControlError(f"cannot create the control socket {path}: {exc}; "
                           "run as root or set [control] socket to a writable path") from exc
    return sock


async def serve_control(config: ControlConfig, controller: Controller, *, log: structlog.stdlib.BoundLogger,
                        metrics: Metrics, task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket until cancelled; the socket file is removed on the way out."""
    sock = open_socket(config)
    inode = os.stat(config.socket).st_ino
    log.info("control socket listening", socket=config.socket, mode=config.mode, group=config.group or None)
    try:
        await serve(control_app(controller, log=log, metrics=metrics), sock, task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(config.socket).st_ino == inode:  # not a newer daemon's socket
                os.unlink(config.socket)
