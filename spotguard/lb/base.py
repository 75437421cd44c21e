"""The contract every load-balancer provider implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class LoadBalancer(Protocol):
    """Takes this VM out of a load balancer (and back in on undrain), and tells the platform when the drain is over."""

    name: str

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        """Remove this VM from every configured pool within ``budget`` seconds; returns a detail line.

        Retries throttling and 5xx inside the budget; raises ``LoadBalancerError`` naming what to fix.
        """
        ...

    async def register(self, *, budget: float, dry_run: bool) -> str:
        """Undo ``deregister``: put this VM back into every pool it left, within ``budget`` seconds.

        Same retries as ``deregister``; already being a member counts as done. Returns a detail line;
        raises ``LoadBalancerError`` naming what to fix.
        """
        ...

    async def heartbeat(self, *, dry_run: bool) -> None:
        """Keep a platform lifecycle action open while the drain runs (no-op where none exists)."""
        ...

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        """Tell the platform the drain is over (ASG CompleteLifecycleAction); no-op where none exists."""
        ...


@runtime_checkable
class Checkable(Protocol):
    """A provider that can check its setup for start-up and ``doctor`` (AWS: deregistration delay)."""

    async def check(self, *, budget: float) -> tuple[str, ...]:
        """Warnings, one line each; an empty tuple when all is well. Never raises for a failed call."""
        ...
