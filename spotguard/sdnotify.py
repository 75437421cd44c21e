"""systemd's notify protocol (sd_notify) without libsystemd: one datagram per state change.

Under ``Type=notify`` systemd waits for ``READY=1`` before it counts the unit as started, kills and
restarts it when ``WATCHDOG=1`` stops arriving within ``WatchdogSec``, and shows ``STATUS=`` text in
``systemctl status``. ``$NOTIFY_SOCKET`` names a Unix datagram socket; a leading ``@`` means the
Linux abstract namespace. Outside systemd the variable is unset and every call here does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import anyio

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"
RELOADING = "RELOADING=1"


def _address(environ: Mapping[str, str]) -> str | bytes | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        # Abstract socket names start with a NUL byte; the '@' is only systemd's way of writing it.
        return b"\0" + path[1:].encode()
    return path


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Sends ``lines`` (e.g. ``READY=1``) as one datagram; False when not under systemd or it failed.

    Never raises: a supervisor that is gone must not take the daemon down with it.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None or not lines:
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram to a local socket does not block for long, but a full receive queue would;
            # systemd drains it promptly, so a short timeout only guards against a wedged manager.
            sock.settimeout(1.0)
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def ready(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    """Tells systemd the daemon is up (``Type=notify`` units count as started only now)."""
    return notify(READY, *((f"STATUS={status}",) if status else ()), environ=environ)


def stopping(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    """Tells systemd the daemon is shutting down on purpose (draining)."""
    return notify(STOPPING, *((f"STATUS={status}",) if status else ()), environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """Keep-alive for ``WatchdogSec``: send at least every :func:`watchdog_interval` seconds."""
    return notify(WATCHDOG, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Free-form text shown by ``systemctl status`` (one line; newlines would start new fields)."""
    return notify(f"STATUS={' '.join(text.splitlines())}", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None when no watchdog is set.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; another process
    (a child that inherited the environment) must not feed it.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def keep_alive(environ: Mapping[str, str] | None = None) -> None:
    """Feeds the watchdog until cancelled; returns at once when the unit has no ``WatchdogSec``.

    Run it in the daemon's task group: if the event loop wedges, the keep-alives stop and systemd
    restarts the daemon, which is the point of the watchdog.
    """
    interval = watchdog_interval(environ)
    if interval is None:
        return
    while True:
        watchdog(environ=environ)
        await anyio.sleep(interval)
