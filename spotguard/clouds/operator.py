"""Notices that come from the machine rather than the cloud: the OS shutdown signal and a manual drain."""

from __future__ import annotations

import subprocess
from datetime import timedelta

from spotguard.notice import Notice, rfc3339, stable_id, utcnow, window


def shutdown_notice(budget: float) -> Notice:
    """SIGTERM while serving: on GCP the OS shutdown is often the only notice there is."""
    now = utcnow()
    return Notice(source="shutdown", kind="sigterm", event_id=stable_id("shutdown", rfc3339(now)),
                  deadline=now + timedelta(seconds=budget), detected_at=now)


def manual_notice(reason: str, seconds: float) -> Notice:
    """An operator's ``spotguard drain``; the reason is kept short and shown in status."""
    now = utcnow()
    return Notice(source="manual", kind="manual", event_id=stable_id("manual", reason, rfc3339(now)),
                  deadline=window(seconds, now), detected_at=now, payload=reason[:200])


def undrain_notice(budget: float) -> Notice:
    """The pseudo-notice an undrain's restore runs under: its deadline bounds the undo steps."""
    now = utcnow()
    return Notice(source="undrain", kind="undrain", event_id=stable_id("undrain", rfc3339(now)),
                  deadline=now + timedelta(seconds=budget), detected_at=now)


RUNNING_STATES = frozenset({"running", "degraded", "starting", "initializing", "maintenance"})
"""``systemctl is-system-running`` answers that mean the machine is up: a SIGTERM then is a restart of
our unit (an upgrade, an operator), not the machine going away."""


def system_is_stopping(timeout: float = 2.0) -> bool | None:
    """True while systemd is shutting the machine down, False while it runs, None when it cannot be told.

    None (no systemctl, not booted with systemd, no answer) is for the caller to treat as stopping: a
    missed drain loses work, an unneeded one only costs a restart of the engine.
    """
    try:
        result = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = result.stdout.strip()
    if answer == "stopping":
        return True
    if answer in RUNNING_STATES:
        return False
    return None
