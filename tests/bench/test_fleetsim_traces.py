"""bench/sim: interruption traces (the SpotHedge format) and synthetic schedules from published rates."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from bench.sim import synthetic, traces
from bench.sim.errors import SimInputError
from bench.sim.schedule import MONTH_S


def _zone(directory: Path, name: str, live: list[int], gap: float = 300) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": live}))


def test_reads_a_spothedge_directory_and_guesses_the_cloud(tmp_path: Path) -> None:
    _zone(tmp_path / "GCP1", "us-central1-a", [4, 4, 1, 1, 4])
    _zone(tmp_path / "GCP1", "us-west1-b", [2, 2, 2, 0, 0])
    trace = traces.load_spothedge(tmp_path / "GCP1")
    assert trace.cloud == "gcp"
    assert [z.name for z in trace.zones] == ["us-central1-a", "us-west1-b"]
    assert trace.gap_s == 300 and trace.slots == 5 and trace.target == 4


def test_a_zone_drop_is_one_correlated_eviction_scaled_to_the_fleet(tmp_path: Path) -> None:
    _zone(tmp_path / "AWS9", "a", [4, 4, 1, 1, 4])
    _zone(tmp_path / "AWS9", "b", [4, 4, 4, 4, 4])
    trace = traces.load_spothedge(tmp_path / "AWS9")
    schedule = traces.to_schedule(trace, 40, rng=random.Random(1))
    assert schedule.window_s == 120.0
    # zone a holds 20 replicas; 4 -> 1 live of a target of 4 takes 15 of them at one instant, in slot 1..2
    assert [(e.zone, e.count, e.zone_replicas) for e in schedule.evictions] == [(0, 15, 20)]
    assert 300 <= schedule.evictions[0].at_s < 600
    # zone a ran 5 of its 20 on spot for two slots; the rest of those slots ran on on-demand
    assert schedule.on_demand_replica_s == 2 * 15 * 300
    assert schedule.spot_replica_s + schedule.on_demand_replica_s == 40 * 4 * 300
    alone = traces.to_schedule(trace, 40, rng=random.Random(1), correlated=False)
    assert [e.count for e in alone.evictions] == [1] * 15


def test_days_beyond_the_trace_are_refused(tmp_path: Path) -> None:
    _zone(tmp_path / "AWS9", "a", [1, 1, 1])
    trace = traces.load_spothedge(tmp_path / "AWS9")
    with pytest.raises(SimInputError, match="covers 0.0 days"):
        traces.to_schedule(trace, 10, rng=random.Random(1), duration_s=86400)


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not JSON"),
    (json.dumps({"data": [1, 2]}), "SpotHedge format"),
    (json.dumps({"metadata": {"gap_seconds": 0}, "data": [1, 2]}), "positive number"),
    (json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, -1]}), r"data\[1\] = -1"),
    (json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, 1.5]}), r"data\[1\] = 1.5"),
    (json.dumps({"metadata": {"gap_seconds": 60}, "data": [3]}), "at least two slots"),
])
def test_malformed_zone_files_name_the_file_and_the_fault(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "AWS9").mkdir()
    (tmp_path / "AWS9" / "zone-a.json").write_text(content)
    with pytest.raises(SimInputError, match=message) as caught:
        traces.load_spothedge(tmp_path / "AWS9")
    assert "zone-a.json" in str(caught.value)


def test_directory_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SimInputError, match="no such trace"):
        traces.load_spothedge(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimInputError, match="no .json zone files"):
        traces.load_spothedge(tmp_path / "empty", "aws")
    _zone(tmp_path / "mine", "a", [1, 0])
    with pytest.raises(SimInputError, match="--cloud"):
        traces.load_spothedge(tmp_path / "mine")
    _zone(tmp_path / "AWS8", "a", [1, 0], gap=300)
    _zone(tmp_path / "AWS8", "b", [1, 0], gap=150)
    with pytest.raises(SimInputError, match="disagree on gap_seconds"):
        traces.load_spothedge(tmp_path / "AWS8")


def test_correlation_figures_of_a_trace(tmp_path: Path) -> None:
    _zone(tmp_path / "GCP9", "a", [4, 0, 4, 3])  # 4 at once (the whole zone), then 1 alone
    share, fraction = traces.correlation(traces.load_spothedge(tmp_path / "GCP9"))
    assert share == pytest.approx(4 / 5) and fraction == pytest.approx(1.0)


@pytest.mark.parametrize("bucket", ["<5%", "5-10%", "10-15%", "15-20%"])
def test_synthetic_evictions_match_their_bucket_over_many_months(bucket: str) -> None:
    months, replicas = 60, 200
    monthly = synthetic.monthly_probability(bucket)
    schedule = synthetic.synthetic_schedule(cloud="aws", zones=4, replicas=replicas, monthly=monthly,
                                            duration_s=months * MONTH_S, rng=random.Random(7), zone_share=0.3,
                                            zone_fraction=0.5)
    expected = -math.log1p(-monthly) * replicas * months  # evictions: the hazard over the replica-months
    # Zone events take 25 replicas each, so the count varies more than a Poisson count would: allow for it.
    sd = math.sqrt(expected * (0.7 + 0.3 * 25))
    assert abs(schedule.replica_evictions - expected) < 4 * sd
    observed = 1 - math.exp(-schedule.replica_evictions / (replicas * months))
    low, high = synthetic.BUCKETS[bucket]
    assert low <= observed <= (high or 1.0)
    zone_events = sum(e.count > 1 for e in schedule.evictions)
    expected_events = 0.3 * expected / 25  # a Poisson count
    assert abs(zone_events - expected_events) < 4 * math.sqrt(expected_events) + 1


def test_synthetic_schedules_are_reproducible_from_the_seed() -> None:
    def draw(seed: int) -> tuple[tuple[float, int, int], ...]:
        schedule = synthetic.synthetic_schedule(cloud="gcp", zones=3, replicas=300, monthly=0.12, duration_s=MONTH_S,
                                                rng=random.Random(seed), zone_share=0.17, zone_fraction=1.0)
        return tuple((e.at_s, e.zone, e.count) for e in schedule.evictions)
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_synthetic_inputs_are_checked() -> None:
    with pytest.raises(SimInputError, match="unknown interruption bucket"):
        synthetic.monthly_probability("30%")
    with pytest.raises(SimInputError, match=r"\[0, 1\)"):
        synthetic.hazard_per_s(1.0)
    assert synthetic.monthly_probability(">20%") == 0.20
