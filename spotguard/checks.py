"""What one ``spotguard doctor`` check reports, and how a list of them is printed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level, "detail": self.detail}


def format_checks(checks: list[Check]) -> str:
    marks = {"ok": "ok  ", "warning": "WARN", "error": "FAIL"}
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"[{marks[c.level]}] {c.name.ljust(width)}  {c.detail}" for c in checks)
