"""The control socket's client, used by ``spotguard drain|undrain|status``."""

from __future__ import annotations

import errno
import grp
import json
import os
from typing import Any

import anyio
import httpx

from spotguard.control.controller import ControlConflict
from spotguard.errors import ControlError

DEFAULT_TIMEOUT = 15.0
BASE_URL = "http://spotguard"
"""The host is ignored on a Unix socket; it only makes the URL well formed."""


async def drain(socket_path: str, *, reason: str = "manual drain", deadline_seconds: float | None = None,
                dry_run: bool = False, timeout: float = DEFAULT_TIMEOUT, group: str = "") -> dict[str, Any]:
    """Ask the daemon to drain now; returns its status document."""
    body = {"reason": reason, "deadline_seconds": deadline_seconds, "dry_run": dry_run}
    return await request(socket_path, "POST", "/drain", body, timeout=timeout, group=group)


async def undrain(socket_path: str, *, force: bool = False, timeout: float = DEFAULT_TIMEOUT,
                  group: str = "") -> dict[str, Any]:
    """Ask the daemon to serve again; refused (``ControlConflict``) while a cloud notice is live."""
    return await request(socket_path, "POST", "/undrain", {"force": force}, timeout=timeout, group=group)


async def status(socket_path: str, *, timeout: float = DEFAULT_TIMEOUT, group: str = "") -> dict[str, Any]:
    """The daemon's status document."""
    return await request(socket_path, "GET", "/status", None, timeout=timeout, group=group)


async def request(socket_path: str, method: str, path: str, body: dict[str, Any] | None, *,
                  timeout: float = DEFAULT_TIMEOUT, group: str = "") -> dict[str, Any]:
    """One call on the control socket; every failure is a ``ControlError`` that says what to do."""
    transport = httpx.AsyncHTTPTransport(uds=socket_path)
    try:
        with anyio.fail_after(timeout):
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=timeout) as client:
                response = await client.request(method, path, json=body)
    except TimeoutError:
        raise ControlError(f"the daemon did not answer on {socket_path} within {timeout:.0f}s") from None
    except httpx.TimeoutException as exc:
        raise ControlError(f"the daemon did not answer on {socket_path} within {timeout:.0f}s") from exc
    except httpx.TransportError as exc:
        raise _explain(socket_path, exc, group) from exc
    try:
        doc = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ControlError(f"{socket_path} answered HTTP {response.status_code} with a body that is not JSON; "
                           "is it really spotguard's control socket? ([control] socket)") from None
    if not isinstance(doc, dict):
        raise ControlError(f"{socket_path} answered with JSON that is not an object")
    if response.status_code == 409:
        raise ControlConflict(str(doc.get("error", "refused")))
    if response.status_code != 200:
        raise ControlError(f"{doc.get('error', 'refused')} (HTTP {response.status_code})")
    return doc


def _os_error(exc: BaseException) -> OSError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _explain(socket_path: str, exc: httpx.TransportError, group: str) -> ControlError:
    cause = _os_error(exc)
    code = cause.errno if cause is not None else None
    text = str(exc)
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        who = group or _socket_group(socket_path)
        if who and who != "root":
            hint = f"run as root or add your user to group {who} ([control] group)"
        else:
            hint = "run as root, or set [control] group so a group of operators may use it"
        return ControlError(f"permission denied on {socket_path}: {hint}")
    if code == errno.ENOENT or "No such file" in text or not os.path.exists(socket_path):
        return ControlError(f"no control socket at {socket_path}: is the spotguard daemon running? "
                            "(systemctl status spotguard; the path is [control] socket)")
    if code == errno.ECONNREFUSED or "refused" in text.lower():
        return ControlError(f"nothing is listening on {socket_path} (a stale socket): "
                            "start the daemon (systemctl start spotguard)")
    return ControlError(f"cannot reach the daemon on {socket_path}: {type(exc).__name__}: {exc}")


def _socket_group(socket_path: str) -> str:
    try:
        return grp.getgrgid(os.stat(socket_path).st_gid).gr_name
    except (OSError, KeyError):
        return ""
