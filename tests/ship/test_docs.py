"""docs/operations.md is what tools/gen_docs.py makes of the code, and the alert rules and dashboard
only name metrics spotguard exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from spotguard import config
from spotguard.metrics import Metrics
from tests.ship.conftest import REPO

DOC = REPO / "docs" / "operations.md"
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bspotguard_[a-z_]+")


def exported_names() -> set[str]:
    metrics = Metrics()
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_generated_blocks_are_up_to_date() -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gen_docs.py"), "--check"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = DOC.read_text().replace("| `poll_interval` |", "| `poll_every` |")
    path = tmp_path / "operations.md"
    path.write_text(stale)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gen_docs.py"), "--check", "--path", str(path)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 1 and "-| `poll_every` |" in done.stdout and "out of date" in done.stderr


def test_every_key_and_metric_is_documented() -> None:
    text = DOC.read_text()
    for section, key, _, _, _ in config.reference():
        assert f"SPOTGUARD_{section.upper()}_{key.upper()}" in text
    for family in Metrics().registry.collect():
        assert family.name in text, family.name


def test_alerts_and_dashboard_name_only_exported_metrics() -> None:
    known = exported_names()
    alerts = DOC.read_text().split("## Alerts", 1)[1]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    used = set(METRIC.findall(alerts)) | {m for e in exprs for m in METRIC.findall(e)}
    assert used and used <= known, used - known
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_metric_exposition_parses() -> None:
    # The reference is only worth something if the exposition it describes is valid.
    families = list(text_string_to_metric_families(Metrics().render().decode()))
    assert {f.name for f in families} >= {"spotguard_nvml_up", "spotguard_gpu_count"}
