"""The contract every engine adapter implements."""

from __future__ import annotations

from typing import Protocol


class EngineAdapter(Protocol):
    """Stops an inference engine from taking new work (and lets it again), and reports its in-flight count."""

    name: str

    async def stop_accepting(self, *, dry_run: bool) -> str:
        """Ask the engine to take no new work (and to drain, where it can). Returns a detail line.

        Raises ``EngineError`` when the engine cannot be reached or refuses.
        """
        ...

    async def resume_accepting(self, *, dry_run: bool) -> str:
        """Undo ``stop_accepting`` (undrain). Returns a detail line.

        Raises ``ManualActionRequired`` when spotguard cannot do it (an engine it signalled but cannot
        start: no systemd unit), ``EngineError`` when the engine refuses or cannot be reached.
        """
        ...

    async def inflight(self) -> int | None:
        """Requests running or queued now; None when the engine cannot tell."""
        ...
