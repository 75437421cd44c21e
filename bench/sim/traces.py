"""Public spot interruption traces in the SkyServe/SpotHedge artifact's format, turned into a fleet's schedule.

One JSON file per zone (``MaoZiming/spothedge_ae``, ``data/AWS1``..``AWS3``, ``data/GCP1``)::

    {"metadata": {"gap_seconds": 300}, "data": [4, 4, 3, 0, 0, 2, ...]}

``data`` is the number of live spot instances of that zone in each fixed slot, while the experimenters kept
asking for the same number in every zone. A drop between two slots is that many evictions in that zone; a
rise is capacity coming back. The files are read from where the user keeps them: nothing is copied here.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from bench.sim.errors import SimInputError
from bench.sim.schedule import NOTICE_WINDOW_S, Eviction, Schedule, split_evenly


@dataclass(frozen=True)
class ZoneTrace:
    name: str
    live: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    source: str
    cloud: str
    gap_s: float
    zones: tuple[ZoneTrace, ...]

    @property
    def slots(self) -> int:
        return min(len(z.live) for z in self.zones)

    @property
    def target(self) -> int:
        """Instances asked for per zone: the most ever live in any zone (the artifact asked all zones alike)."""
        return max(max(z.live[: self.slots]) for z in self.zones)


def _zone_file(path: Path) -> tuple[float, tuple[int, ...]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SimInputError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SimInputError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict) or "data" not in doc:
        raise SimInputError(f'{path}: expected {{"metadata": {{"gap_seconds": N}}, "data": [...]}} (SpotHedge format)')
    gap = doc["metadata"].get("gap_seconds")
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not math.isfinite(gap) or gap <= 0:
        raise SimInputError(f"{path}: metadata.gap_seconds must be a positive number of seconds, got {gap!r}")
    data = doc["data"]
    if not isinstance(data, list) or len(data) < 2:
        raise SimInputError(f"{path}: data must be a list of at least two slots")
    for index, value in enumerate(data):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SimInputError(f"{path}: data[{index}] = {value!r}: a count of live instances must be an integer >= 0")
    return float(gap), tuple(data)


def guess_cloud(path: Path) -> str | None:
    """``aws``/``gcp``/``azure`` from a directory or file name such as ``data/GCP1``, else None."""
    for part in reversed(path.resolve().parts):
        lowered = part.lower()
        for cloud in NOTICE_WINDOW_S:
            if lowered.startswith(cloud):
                return cloud
    return None


def load_spothedge(path: Path, cloud: str | None = None) -> Trace:
    """A directory of per-zone files (or one file) in the SpotHedge format."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json")
        if not files:
            raise SimInputError(f"{path}: no .json zone files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise SimInputError(f"{path}: no such trace file or directory")
    cloud = cloud or guess_cloud(path)
    if cloud not in NOTICE_WINDOW_S:
        raise SimInputError(f"{path}: cannot tell the cloud from the name; pass --cloud aws|gcp|azure")
    zones = []
    gaps = set()
    for file in files:
        gap, live = _zone_file(file)
        gaps.add(gap)
        zones.append(ZoneTrace(file.stem, live))
    if len(gaps) != 1:
        raise SimInputError(f"{path}: zone files disagree on gap_seconds ({sorted(gaps)}); simulate them separately")
    trace = Trace(str(path), cloud, gaps.pop(), tuple(zones))
    if trace.target == 0:
        raise SimInputError(f"{path}: no zone ever had a live instance: nothing to scale to a fleet")
    return trace


def correlation(trace: Trace) -> tuple[float, float]:
    """(share of evicted instances that left in a drop of two or more at once, the mean fraction of the zone's
    live instances such a drop took): the defaults of synthetic zone-wide events come from these."""
    evicted = together = 0
    fractions = []
    for zone in trace.zones:
        for before, after in zip(zone.live, zone.live[1:], strict=False):
            if after < before:
                evicted += before - after
                if before - after >= 2:
                    together += before - after
                    fractions.append((before - after) / before)
    share = together / evicted if evicted else 0.0
    return share, (sum(fractions) / len(fractions) if fractions else 0.0)


def to_schedule(trace: Trace, replicas: int, *, rng: random.Random, correlated: bool = True,
                duration_s: float | None = None) -> Schedule:
    """The fleet's evictions when each zone holds an equal share of ``replicas`` and its spot replicas follow
    the trace's live fraction of the zone's target; what the trace lacks runs on on-demand (the fallback).

    ``correlated``: a drop of d of a zone's L live instances takes d/L of the fleet's replicas there at the
    same instant (the trace's own correlation); otherwise each goes at its own moment within the slot.
    """
    slots = trace.slots
    if duration_s is not None:
        wanted = int(duration_s // trace.gap_s) + 1
        if wanted > slots:
            raise SimInputError(f"{trace.source}: the trace covers {(slots - 1) * trace.gap_s / 86400:.1f} days, "
                                f"fewer than the {duration_s / 86400:.1f} asked for")
        slots = wanted
    shares = split_evenly(replicas, len(trace.zones))
    target = trace.target
    evictions: list[Eviction] = []
    spot_s = on_demand_s = 0.0
    for index, (zone, share) in enumerate(zip(trace.zones, shares, strict=True)):
        counts = [round(share * live / target) for live in zone.live[:slots]]
        for slot in range(slots - 1):
            before, after = counts[slot], counts[slot + 1]
            spot_s += before * trace.gap_s
            on_demand_s += (share - before) * trace.gap_s
            if after >= before:
                continue
            start = slot * trace.gap_s
            if correlated:
                evictions.append(Eviction(start + rng.random() * trace.gap_s, index, before - after, before))
            else:
                evictions += [Eviction(start + rng.random() * trace.gap_s, index, 1, before)
                              for _ in range(before - after)]
    evictions.sort(key=lambda e: e.at_s)
    mode = "zone drops at once" if correlated else "each eviction on its own"
    return Schedule(f"trace {Path(trace.source).name} ({len(trace.zones)} zones, {mode})", trace.cloud,
                    tuple(z.name for z in trace.zones), replicas, (slots - 1) * trace.gap_s, tuple(evictions),
                    spot_s, on_demand_s)
