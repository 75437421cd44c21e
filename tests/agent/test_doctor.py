"""doctor's static checks: the drain budget against the cloud window, and unit ordering."""

from __future__ import annotations

from pathlib import Path

from spotguard.config import load
from spotguard.doctor import budget_check, unit_order_check

REPO = Path(__file__).resolve().parents[2]


def test_budget_check_warns_when_the_gcp_window_is_too_short() -> None:
    config = load(None, environ={})
    assert budget_check(config, "aws").level == "ok" or budget_check(config, "aws").level == "warning"
    assert budget_check(config, "gcp").level == "warning"
    tight = load(None, environ={}, overrides={"drain": {"safety_margin": 40.0}, "shutdown": {"budget": 60.0}})
    assert budget_check(tight, "gcp").level == "error"


def test_unit_order_check_reads_the_shipped_unit_and_drop_in(tmp_path: Path) -> None:
    config = load(None, environ={}, overrides={"server": {"unit": "vllm.service"}})
    assert unit_order_check(config, (tmp_path,)).level == "warning"
    (tmp_path / "spotguard.service").write_text((REPO / "systemd" / "spotguard.service").read_text())
    assert unit_order_check(config, (tmp_path,)).level == "error"
    drop_in = tmp_path / "spotguard.service.d"
    drop_in.mkdir()
    source = next((REPO / "systemd" / "spotguard.service.d").glob("*.conf"))
    (drop_in / source.name).write_text(source.read_text())
    assert unit_order_check(config, (tmp_path,)).level == "ok"
