"""kind = none: no engine to stop; the drain still fails readiness, deregisters and snapshots."""

from __future__ import annotations


class NoEngine:
    name = "none"

    async def stop_accepting(self, *, dry_run: bool) -> str:
        return "no engine configured ([server] kind = none): nothing stopped"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        return "no engine configured ([server] kind = none): nothing to restart"

    async def inflight(self) -> int | None:
        return None
