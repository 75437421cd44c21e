"""install-spotguard.sh, run for real into a temporary root: venv, config, unit and drop-in land where the unit expects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import spotguard
from spotguard import config
from tests.ship.conftest import INSTALL_SCRIPT, Installed


def test_installed_cli_runs(installed: Installed) -> None:
    venv = installed.root / "opt/spotguard/venv"
    # Staged for a machine where it lives at /: the script names /opt/..., so run it with the staged python.
    assert (venv / "bin/spotguard").read_text().startswith("#!/opt/spotguard/venv/bin/python")
    done = subprocess.run([str(venv / "bin/python"), str(venv / "bin/spotguard"), "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert spotguard.__version__ in done.stdout
    # Its own interpreter, not this test run's packages: the VM has nothing else installed.
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg


def test_files_are_where_the_unit_expects_them(installed: Installed) -> None:
    root = installed.root
    unit = (root / "etc/systemd/system/spotguard.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    binary, _, args = exec_start.removeprefix("ExecStart=").partition(" ")
    assert (root / binary.lstrip("/")).is_file()
    config_path = args.split("--config ", 1)[1].split()[0]
    assert (root / config_path.lstrip("/")).is_file()
    dropin = (root / "etc/systemd/system/spotguard.service.d/10-inference.conf").read_text()
    assert "After=vllm.service" in dropin and "Wants=vllm.service" in dropin
    assert (root / "etc/systemd/system/spotguard-gate.service").is_file()
    gate_dropin = (root / "etc/systemd/system/spotguard-gate.service.d/10-inference.conf").read_text()
    assert "After=vllm.service" in gate_dropin


def test_default_config_is_valid_and_names_the_engine_unit(installed: Installed) -> None:
    path = installed.root / "etc/spotguard/spotguard.toml"
    assert oct(path.stat().st_mode & 0o777) == "0o640"  # may hold webhook URLs
    loaded = config.load(path, environ={})
    assert loaded.server.unit == "vllm.service"
    assert loaded.agent == config.AgentConfig()  # everything else stays at its default
    for section, key, _, _, _ in config.reference():
        assert f"# {key} = " in path.read_text() or (section, key) == ("server", "unit")


def test_rerun_keeps_an_edited_config_and_installs_a_given_one(installed: Installed, spotguard_wheel: Path,
                                                              tmp_path: Path) -> None:
    path = installed.root / "etc/spotguard/spotguard.toml"
    original = path.read_text()
    path.write_text(original + "\n# edited by the operator\n")
    args = ["sh", str(INSTALL_SCRIPT), "--wheel", str(spotguard_wheel), "--root", str(installed.root),
            "--python", sys.executable, "--no-enable", "--inference-unit", "vllm"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert path.read_text().endswith("# edited by the operator\n")
        given = tmp_path / "mine.toml"
        given.write_text('[agent]\ncloud = "gcp"\n')
        done = subprocess.run([*args, "--config", str(given)], capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert config.load(path, environ={}).agent.cloud == "gcp"
    finally:
        path.write_text(original)


def test_bad_arguments_fail_before_touching_anything(tmp_path: Path) -> None:
    cases = {
        (): "give --wheel PATH or --version X",
        ("--wheel", str(tmp_path / "none.whl")): "no such file",
        ("--version", "1", "--inference-unit", "bad unit;rm"): "not a systemd unit name",
        ("--version", "1", "--extras", "aws]; x"): "comma-separated",
        ("--version", "1", "--bogus"): "unknown option: --bogus",
        ("--version", "1", "--config", str(tmp_path / "none.toml")): "no such file",
    }
    for args, message in cases.items():
        done = subprocess.run(["sh", str(INSTALL_SCRIPT), *args, "--root", str(tmp_path / "root")],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not (tmp_path / "root").exists()
