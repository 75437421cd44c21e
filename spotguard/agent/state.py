"""The node's drain state, persisted atomically so a restarted daemon on a draining node stays draining."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from spotguard.notice import Notice

NodeState = Literal["serving", "draining", "drained"]
STATE_FILE = "state.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, kw_only=True)
class Persisted:
    state: NodeState = "serving"
    notice: Notice | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    boot_id: str = ""

    def with_(self, **changes: Any) -> Persisted:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "notice": self.notice.to_json() if self.notice else None,
            "timeline": self.timeline,
            "boot_id": self.boot_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Persisted:
        state = data.get("state", "serving")
        if state not in ("serving", "draining", "drained"):
            raise ValueError(f"unknown state {state!r}")
        notice = Notice.from_json(data["notice"]) if data.get("notice") else None
        timeline = data.get("timeline") or []
        if not isinstance(timeline, list):
            raise ValueError("timeline is not a list")
        return cls(state=state, notice=notice, timeline=timeline, boot_id=str(data.get("boot_id", "")))


class StateStore:
    """Reads and atomically replaces ``<state_dir>/state.json``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def load(self) -> tuple[Persisted, str | None]:
        """The saved state and, when it was unreadable, why (the daemon then starts serving and says so)."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return Persisted(boot_id=current_boot_id()), None
        except OSError as exc:
            return Persisted(boot_id=current_boot_id()), f"cannot read {self.path}: {exc}"
        try:
            return Persisted.from_json(json.loads(raw)), None
        except (ValueError, KeyError, TypeError) as exc:
            return Persisted(boot_id=current_boot_id()), f"corrupt {self.path}: {exc}"

    def save(self, persisted: Persisted) -> None:
        """Write to a temporary file, fsync, rename: a crash leaves the old or the new file, never half."""
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(persisted.to_json(), sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            dir_fd = os.open(self.dir, os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
