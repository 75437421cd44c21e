"""What the control socket asks of the daemon, and the requests it accepts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from spotguard.errors import ControlError

MAX_REASON = 200


class ControlConflict(ControlError):
    """The request is valid but not now (undrain while a cloud notice is live): HTTP 409."""


class ControlBadRequest(ControlError):
    """The request body is not what the endpoint accepts: HTTP 400."""


class Controller(Protocol):
    """Implemented by the daemon's runner; the socket's only way into it.

    Methods raise ``ControlConflict`` when the request cannot be honoured now and ``ControlError``
    for other refusals; the message is shown to the operator as is.
    """

    async def manual_drain(self, reason: str, deadline_seconds: float | None, dry_run: bool) -> dict[str, Any]:
        """Start a drain now; ``deadline_seconds`` None = ``[drain] manual_deadline``. Returns the status."""
        ...

    async def undrain(self, force: bool) -> dict[str, Any]:
        """Return to serving (readiness back on). Returns the status."""
        ...

    def status(self) -> dict[str, Any]:
        """The status document: state, cloud, notice (or None) and the drain's steps."""
        ...


@dataclass(frozen=True, kw_only=True)
class DrainRequest:
    reason: str = "manual drain"
    deadline_seconds: float | None = None
    dry_run: bool = False

    @classmethod
    def parse(cls, data: object) -> DrainRequest:
        fields = _object(data, {"reason", "deadline_seconds", "dry_run"})
        reason = fields.get("reason", "manual drain")
        if not isinstance(reason, str) or not reason.strip():
            raise ControlBadRequest("reason must be a non-empty string")
        if len(reason) > MAX_REASON:
            raise ControlBadRequest(f"reason is longer than {MAX_REASON} characters")
        deadline = fields.get("deadline_seconds")
        if deadline is not None:
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline) \
                    or deadline <= 0:
                raise ControlBadRequest("deadline_seconds must be a positive number of seconds (or null)")
            deadline = float(deadline)
        dry_run = fields.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ControlBadRequest("dry_run must be true or false")
        return cls(reason=reason.strip(), deadline_seconds=deadline, dry_run=dry_run)


@dataclass(frozen=True, kw_only=True)
class UndrainRequest:
    force: bool = False

    @classmethod
    def parse(cls, data: object) -> UndrainRequest:
        fields = _object(data, {"force"})
        force = fields.get("force", False)
        if not isinstance(force, bool):
            raise ControlBadRequest("force must be true or false")
        return cls(force=force)


def _object(data: object, allowed: set[str]) -> dict[str, object]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ControlBadRequest("the body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ControlBadRequest(f"unknown fields {unknown}; allowed: {sorted(allowed)}")
    return {str(k): v for k, v in data.items()}


def live_cloud_notice(status: dict[str, Any]) -> dict[str, Any] | None:
    """The notice in a status document when it came from the platform (not from an operator)."""
    notice = status.get("notice")
    if isinstance(notice, dict) and notice.get("source") != "manual":
        return notice
    return None
