"""An interruption history in one shape, whether it came from a public trace or was drawn from published rates."""

from __future__ import annotations

from dataclasses import dataclass

NOTICE_WINDOW_S = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}
"""Seconds from an eviction notice to the VM going away, by cloud (cited in docs/fleet.md)."""

MONTH_S = 30 * 86400.0


@dataclass(frozen=True)
class Eviction:
    """``count`` replicas of zone ``zone`` get a notice at ``at_s`` (the same instant: correlated)."""

    at_s: float
    zone: int
    count: int
    zone_replicas: int
    """Spot replicas the zone had just before (for the odds that a same-zone peer goes too)."""


@dataclass(frozen=True)
class Schedule:
    """Evictions over ``duration_s`` for a fleet of ``replicas`` spread over ``zones``, and what it paid for."""

    source: str
    cloud: str
    zones: tuple[str, ...]
    replicas: int
    duration_s: float
    evictions: tuple[Eviction, ...]
    spot_replica_s: float
    """Replica-seconds run on spot (billed at the spot price)."""
    on_demand_replica_s: float
    """Replica-seconds the fleet ran on on-demand while its zones had no spot capacity (the fallback)."""

    @property
    def window_s(self) -> float:
        return NOTICE_WINDOW_S[self.cloud]

    @property
    def replica_evictions(self) -> int:
        return sum(e.count for e in self.evictions)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` replicas over ``parts`` zones, the remainder to the first zones."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
