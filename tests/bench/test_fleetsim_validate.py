"""bench/sim against bench/fleet.py: on 3 nodes and one eviction the simulator predicts, class by class, what
the bench measures, within the measurement's own run-to-run spread.

The check runs on the measured run committed as bench/data/fleet.json, and on a hand-written document in the
bench's schema (tests/bench/fleet_fixture.py) whose counts differ from it (a loss the model must also predict).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sim.errors import SimInputError
from bench.sim.measured import load_fleet, load_migrate
from bench.sim.validate import measured_pieces, validate, wilson
from tests.bench import fleet_fixture

REPO = Path(__file__).resolve().parents[2]
MEASURED_FLEET = REPO / "bench" / "data" / "fleet.json"
MIGRATE = REPO / "bench" / "data" / "migrate.json"


@pytest.mark.parametrize("source", ["fixture", "measured"])
def test_three_nodes_one_eviction_class_by_class(tmp_path: Path, source: str) -> None:
    if source == "measured":
        path = MEASURED_FLEET
    else:
        path = fleet_fixture.write(tmp_path / "fleet.json")
    classes, tokens = validate(load_fleet(path), load_migrate(MIGRATE))
    assert {(c.variant, c.cls) for c in classes} == {(v, c) for v in ("baseline", "spotguard")
                                                     for c in ("during_drain", "finishable", "outlasting", "others")}
    misses = [c for c in classes if not c.ok] + [t for t in tokens if not t.ok]
    assert not misses


def test_a_measurement_the_model_cannot_explain_fails(tmp_path: Path) -> None:
    """Spotguard losing a tenth of what is sent during the drain (it hands all of it to peers) is outside what
    the model predicts: the check has teeth."""
    path = fleet_fixture.write(tmp_path / "fleet.json", spotguard_during_lost=9)
    classes, _ = validate(load_fleet(path), load_migrate(MIGRATE))
    failed = {(c.variant, c.cls) for c in classes if not c.ok}
    assert failed == {("spotguard", "during_drain")}


def test_a_run_with_resume_is_checked_as_resume_and_gives_its_delay(tmp_path: Path) -> None:
    bench = load_fleet(fleet_fixture.write(tmp_path / "fleet.json", resumed_after_s=3.0))
    assert bench.resumable("spotguard") and not bench.resumable("baseline")
    assert measured_pieces(bench, load_migrate(MIGRATE)).resume_delay_s == pytest.approx(3.0)
    classes, tokens = validate(bench, load_migrate(MIGRATE))
    outlasting = next(c for c in classes if c.variant == "spotguard" and c.cls == "outlasting")
    assert outlasting.measured_lost == (0, 0) and outlasting.predicted_lost == pytest.approx(0.0)
    assert all(c.ok for c in classes)


def test_wilson_interval() -> None:
    low, high = wilson(0.0, 81)
    assert low == 0.0 and 0.04 < high < 0.05
    low, high = wilson(0.5, 2)
    assert 0.09 < low < 0.1 and 0.9 < high < 0.91


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(bench="gate"), "not a bench/fleet.py result"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d["setup"].pop("window_s"), "setup.window_s"),
    (lambda d: d["variants"]["baseline"].update(rounds=[]), "non-empty list"),
    (lambda d: d["variants"]["baseline"]["rounds"][0]["classes"].pop("others"), "expected the classes"),
    (lambda d: d["variants"]["baseline"]["rounds"][0]["classes"]["others"].update(lost=99), "lost 99 > total"),
    (lambda d: d["variants"]["baseline"]["rounds"][0]["requests"][0].update(sent_at_s="soon"), "expected a number"),
])
def test_malformed_bench_json_is_refused_with_the_place(tmp_path: Path, change: object, message: str) -> None:
    doc = fleet_fixture.document()
    change(doc)  # type: ignore[operator]
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SimInputError, match=message):
        load_fleet(path)


def test_migrate_json_needs_both_variants(tmp_path: Path) -> None:
    path = tmp_path / "migrate.json"
    path.write_text(json.dumps([{"variant": "peers", "streams": 4, "completed": 4}]))
    with pytest.raises(SimInputError, match="baseline and peers"):
        load_migrate(path)
