"""The systemd unit: `systemd-analyze verify` clean, and its settings agree with spotguard's defaults."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from spotguard import config
from tests.ship.conftest import SYSTEMD_DIR, Installed, need_tool, unit_root

UNIT = SYSTEMD_DIR / "spotguard.service"
DROPIN = SYSTEMD_DIR / "spotguard.service.d" / "10-inference.conf"
GATE = SYSTEMD_DIR / "spotguard-gate.service"
GATE_DROPIN = SYSTEMD_DIR / "spotguard-gate.service.d" / "10-inference.conf"


def settings(*paths: Path) -> dict[str, list[str]]:
    """Key -> values of unit files (systemd's own syntax: Key=Value lines, '#' comments)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for line in path.read_text().splitlines():
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                found[key.strip()].append(value.strip())
    return found


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    tool = need_tool("systemd-analyze")
    # --root makes verify resolve units, ExecStart and drop-ins inside the root, so the check sees the
    # same tree a VM would have, without touching this machine's /etc.
    return subprocess.run([tool, "verify", "--man=no", f"--root={root}", "spotguard.service",
                           "spotguard-gate.service"],
                          capture_output=True, text=True, timeout=60, check=False)


def stage(root: Path, engine: bool = True) -> Path:
    units = unit_root(root) / "etc/systemd/system"
    (units / "spotguard.service.d").mkdir(parents=True, exist_ok=True)
    (units / "spotguard-gate.service.d").mkdir(parents=True, exist_ok=True)
    shutil.copy2(UNIT, units / "spotguard.service")
    shutil.copy2(DROPIN, units / "spotguard.service.d" / DROPIN.name)
    shutil.copy2(GATE, units / "spotguard-gate.service")
    shutil.copy2(GATE_DROPIN, units / "spotguard-gate.service.d" / GATE_DROPIN.name)
    binary = root / "opt/spotguard/venv/bin/spotguard"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    if engine:
        (units / "vllm.service").write_text("[Service]\nExecStart=/opt/spotguard/venv/bin/spotguard\n")
    return root


def test_unit_and_dropin_verify_clean(tmp_path: Path) -> None:
    done = verify(stage(tmp_path))
    # verify exits 0 on unknown keys and bad values, only warning: any output is a finding.
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    root = stage(tmp_path)
    unit = root / "etc/systemd/system/spotguard.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nRestart=sometimes"))
    done = verify(root)
    assert "Failed to parse service restart specifier" in done.stderr


def test_installed_tree_verifies(installed: Installed) -> None:
    root = unit_root(installed.root)
    (root / "etc/systemd/system/vllm.service").write_text(
        "[Service]\nExecStart=/opt/spotguard/venv/bin/python -c pass\n")
    done = verify(root)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_unit_matches_spotguard_defaults() -> None:
    unit = settings(UNIT)
    defaults = config.Config()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"/opt/spotguard/venv/bin/spotguard run --config {config.DEFAULT_CONFIG_PATH}"]
    assert Path("/var/lib", unit["StateDirectory"][0]) == Path(defaults.agent.state_dir)
    assert Path("/run", unit["RuntimeDirectory"][0]) == Path(defaults.control.socket).parent
    # SIGKILL must not cut the shutdown drain short.
    assert float(unit["TimeoutStopSec"][0]) > defaults.shutdown.budget + 5
    assert unit["KillMode"] == ["mixed"] and unit["Restart"] == ["always"]
    watchdog = float(unit["WatchdogSec"][0])
    assert 10 <= watchdog <= 60
    assert "AF_UNIX" in unit["RestrictAddressFamilies"][0] and "AF_INET6" in unit["RestrictAddressFamilies"][0]
    # Hardening that would stop it from doing its job stays off (see the comments in the unit).
    for key in ("PrivateDevices", "ProtectProc", "PrivateNetwork", "PrivateUsers"):
        assert key not in unit, key


def test_dropin_orders_spotguard_after_the_engine() -> None:
    # Stopped in reverse start order: After= the engine means spotguard stops (and drains) first.
    dropin = settings(DROPIN)
    assert dropin["After"] == ["vllm.service"] and dropin["Wants"] == ["vllm.service"]
    assert "Requires" not in dropin and "BindsTo" not in dropin


def test_gate_unit_outlives_spotguard_and_matches_its_defaults() -> None:
    gate, unit = settings(GATE), settings(UNIT)
    defaults = config.Config()
    assert gate["ExecStart"] == [f"/opt/spotguard/venv/bin/spotguard gate --config {config.DEFAULT_CONFIG_PATH}"]
    assert gate["Type"] == ["notify"] and gate["Restart"] == ["on-failure"]
    assert float(gate["TimeoutStopSec"][0]) > defaults.gate.stop_timeout
    # Started before spotguard, stopped after it; never restarted or stopped along with it.
    assert gate["Before"] == ["spotguard.service"]
    assert "spotguard-gate.service" in unit["Wants"] and "spotguard-gate.service" in unit["After"]
    for key in ("Requires", "BindsTo", "PartOf"):
        assert key not in unit and key not in gate, key
    # Both units name the same control socket, in the gate's own runtime directory (not /run/spotguard,
    # which goes away while spotguard.service restarts), and the daemon leaves starting it to systemd.
    socket_env = "SPOTGUARD_GATE_CONTROL_SOCKET=/run/spotguard-gate/gate.sock"
    assert socket_env in gate["Environment"] and socket_env in unit["Environment"]
    assert Path("/run", gate["RuntimeDirectory"][0]) == Path("/run/spotguard-gate")
    assert "SPOTGUARD_GATE_START=external" in unit["Environment"]
    assert settings(GATE_DROPIN)["After"] == ["vllm.service"]


@pytest.mark.parametrize("path", [UNIT, DROPIN, GATE, GATE_DROPIN])
def test_unit_files_end_with_newline(path: Path) -> None:
    assert path.read_text().endswith("\n")
