"""bench/fleetsim.py as an operator runs it: a trace path in, the table, the JSON and the picture out."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("fleetsim", REPO / "bench" / "fleetsim.py")
assert _SPEC is not None and _SPEC.loader is not None
fleetsim = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fleetsim)


def _trace(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for zone, live in (("us-central1-a", [4, 4, 0, 0, 4, 4, 3, 4]), ("us-east1-b", [4, 3, 3, 4, 4, 2, 2, 4])):
        (directory / f"{zone}.json").write_text(json.dumps({"metadata": {"gap_seconds": 150}, "data": live}))
    return directory


def test_one_command_gives_the_table_the_json_and_the_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = _trace(tmp_path / "GCP1")
    workload = tmp_path / "requests.jsonl"
    workload.write_text("\n".join(json.dumps({"input_tokens": 500, "output_tokens": n, "stream": n % 2 == 0})
                                  for n in range(50, 1500, 7)))
    code = fleetsim.main(["--trace", str(trace), "--gpus", "200", "--workload", str(workload), "--samples", "500",
                          "--json", str(tmp_path / "out.json"), "--svg", str(tmp_path / "out.svg"),
                          "--on-demand-price", "3.0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "gcp notice 30 s" in printed.out and "| no spotguard" in printed.out
    assert "no resume measurement" in printed.err
    doc = json.loads((tmp_path / "out.json").read_text())
    assert [p["policy"] for p in doc["policies"]] == ["none", "spotguard", "peers-zone", "peers-cross"]
    assert doc["schedule"]["replica_evictions"] > 0
    for policy in doc["policies"]:
        assert 0 <= policy["lost"] <= policy["requests"]
        assert policy["tokens_generated_per_delivered"] >= 1.0
        assert 0 < policy["cost_vs_on_demand"] < 1 and policy["cost_per_million_tokens"] > 0
    assert doc["inputs"]["measured"]["migrate_json"].endswith("bench/data/migrate.json")
    svg = ET.fromstring((tmp_path / "out.svg").read_text())
    texts = "".join(svg.itertext())
    for label in ("no spotguard", "spotguard, no peers", "peers, same zone", "peers, other zones",
                  "requests lost per million"):
        assert label in texts


def test_synthetic_bucket_runs_without_a_trace(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleetsim.main(["--bucket", "10-15%", "--cloud", "azure", "--gpus", "100", "--samples", "300"]) == 0
    out = capsys.readouterr().out
    assert "synthetic azure bucket 10-15% (12.5% a month)" in out and "azure notice 30 s" in out


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "AWS1").mkdir()
    (tmp_path / "AWS1" / "z.json").write_text('{"metadata": {}, "data": [1, 0]}')
    assert fleetsim.main(["--trace", str(tmp_path / "AWS1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetsim: ") and "z.json" in err and "gap_seconds" in err
    assert fleetsim.main(["--gpus", "100"]) == 2
    assert "--trace DIR, --bucket or --monthly-rate" in capsys.readouterr().err


def test_a_resume_measurement_adds_the_resume_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import fleet_fixture

    resumed = fleet_fixture.write(tmp_path / "resume.json", resumed_after_s=3.0)
    assert fleetsim.main(["--bucket", ">20%", "--cloud", "gcp", "--gpus", "100", "--samples", "300",
                          "--resume-json", str(resumed), "--json", str(tmp_path / "out.json")]) == 0
    policies = json.loads((tmp_path / "out.json").read_text())["policies"]
    assert [p["policy"] for p in policies][-1] == "resume"
    assert "| peers + resume" in capsys.readouterr().out
