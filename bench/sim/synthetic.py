"""Interruption histories drawn from published rates, seeded and reproducible.

The AWS Spot Instance Advisor groups instance types by "frequency of interruption": the rate at which Spot
reclaimed capacity during the trailing month, in the buckets below. We read a bucket as the probability that
a given instance is interrupted within a month, and draw evictions as a Poisson process with the matching
constant hazard, replacing each evicted replica at once (the Advisor has no notion of capacity shortage).
A configurable share of the evictions comes as zone-wide events that take a fraction of one zone at the
same instant, as the multi-instance public traces show.
"""

from __future__ import annotations

import math
import random

from bench.sim.errors import SimInputError
from bench.sim.schedule import MONTH_S, Eviction, Schedule, split_evenly

BUCKETS: dict[str, tuple[float, float | None]] = {
    "<5%": (0.0, 0.05), "5-10%": (0.05, 0.10), "10-15%": (0.10, 0.15), "15-20%": (0.15, 0.20), ">20%": (0.20, None),
}
"""Monthly interruption frequency, as the Spot Instance Advisor labels it."""

ZONE_CORRELATION = {"aws": (0.64, 0.80), "gcp": (0.17, 1.0), "azure": (0.17, 1.0)}
"""(share of evictions that come zone-wide, fraction of the zone each takes), measured on the public traces
with ``bench/fleetsim.py --trace-stats``: AWS from ``spothedge_ae`` data/AWS1 (4 instances per zone, 5-minute
slots), GCP from data/GCP1; Azure has no public trace there, so it borrows GCP's."""


def monthly_probability(bucket: str) -> float:
    """The bucket's midpoint; ">20%" has no upper bound, so its floor (figures for it are a lower bound)."""
    if bucket not in BUCKETS:
        raise SimInputError(f"unknown interruption bucket {bucket!r}; one of {', '.join(BUCKETS)}")
    low, high = BUCKETS[bucket]
    return low if high is None else (low + high) / 2


def hazard_per_s(monthly: float) -> float:
    """Constant eviction hazard of a replica whose chance of an interruption within a month is ``monthly``."""
    if not 0.0 <= monthly < 1.0:
        raise SimInputError(f"a monthly interruption probability must be in [0, 1), got {monthly}")
    return -math.log1p(-monthly) / MONTH_S


def _poisson_times(rate_per_s: float, duration_s: float, rng: random.Random) -> list[float]:
    times: list[float] = []
    if rate_per_s <= 0:
        return times
    at = rng.expovariate(rate_per_s)
    while at < duration_s:
        times.append(at)
        at += rng.expovariate(rate_per_s)
    return times


def synthetic_schedule(*, cloud: str, zones: int, replicas: int, monthly: float, duration_s: float,
                       rng: random.Random, zone_share: float, zone_fraction: float, label: str = "") -> Schedule:
    """Evictions of ``replicas`` over ``zones`` at a monthly interruption probability of ``monthly``:
    ``zone_share`` of them in zone-wide events that each take ``zone_fraction`` of one zone at once."""
    if zones < 1 or replicas < zones:
        raise SimInputError(f"need at least one replica per zone ({replicas} replicas, {zones} zones)")
    if not 0.0 <= zone_share <= 1.0 or not 0.0 < zone_fraction <= 1.0:
        raise SimInputError("--zone-share must be in [0, 1] and --zone-fraction in (0, 1]")
    hazard = hazard_per_s(monthly)
    evictions: list[Eviction] = []
    for zone, share in enumerate(split_evenly(replicas, zones)):
        for at in _poisson_times(share * hazard * (1 - zone_share), duration_s, rng):
            evictions.append(Eviction(at, zone, 1, share))
        taken = max(1, round(zone_fraction * share))
        # Zone events take `taken` replicas each; their rate keeps the per-replica hazard at `hazard`.
        for at in _poisson_times(share * hazard * zone_share / taken, duration_s, rng):
            evictions.append(Eviction(at, zone, taken, share))
    evictions.sort(key=lambda e: e.at_s)
    name = label or f"{monthly:.1%} a month"
    return Schedule(f"synthetic {cloud} {name} ({zones} zones, {zone_share:.0%} of evictions zone-wide, "
                    f"{zone_fraction:.0%} of a zone each)", cloud, tuple(f"zone-{i + 1}" for i in range(zones)),
                    replicas, duration_s, tuple(evictions), replicas * duration_s, 0.0)
