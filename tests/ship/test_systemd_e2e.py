"""End to end under a real systemd as PID 1 (systemd-nspawn): at shutdown spotguard is stopped, and
drains, while the inference engine still runs; the engine is stopped only after spotguard has exited.

The container boots this machine's /usr on an empty tmpfs root (--volatile=yes) with the installed
tree bound in: /opt/spotguard (the staged virtualenv), /etc/spotguard, and the real unit + drop-in.
A driver unit powers the container off once everything runs, so the shutdown is the notice, as on GCP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.ship.conftest import SYSTEMD_DIR, Installed, need_tool

E2E = Path(__file__).parent / "e2e"


def events(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in path.read_text().splitlines():
        stamp, _, text = line.partition(" ")
        rows.append((float(stamp), text.strip()))
    return rows


def boot(installed: Installed, tmp_path: Path, dropins: list[Path], config: str | None = None, *,
         gate: bool = False, driver: Path = E2E / "e2e-driver.service") -> tuple[Path, str]:
    """Boots a container into e2e.target, lets it power itself off, and returns (events file, console)."""
    nspawn = need_tool("systemd-nspawn")
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    if not os.path.realpath(installed.root / "opt/spotguard/venv/bin/python3").startswith("/usr/"):
        pytest.skip("the staged virtualenv is not built on /usr/bin/python3, which is all the container sees")
    units = tmp_path / "units"
    (units / "spotguard.service.d").mkdir(parents=True)
    shutil.copy2(SYSTEMD_DIR / "spotguard.service", units / "spotguard.service")
    shutil.copy2(installed.root / "etc/systemd/system/spotguard.service.d/10-inference.conf",
                 units / "spotguard.service.d/10-inference.conf")
    for extra in [E2E / "20-e2e.conf", *dropins]:
        shutil.copy2(extra, units / "spotguard.service.d" / extra.name)
    for name in ("e2e.target", "vllm.service"):
        shutil.copy2(E2E / name, units / name)
    shutil.copy2(driver, units / "e2e-driver.service")
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("engine.py", "standin.py"):
        shutil.copy2(E2E / name, shared / name)
    if gate:
        # The unit pair as installed; a slowly streaming engine; a driver that restarts spotguard mid-stream.
        (units / "spotguard-gate.service.d").mkdir()
        shutil.copy2(SYSTEMD_DIR / "spotguard-gate.service", units / "spotguard-gate.service")
        shutil.copy2(installed.root / "etc/systemd/system/spotguard-gate.service.d/10-inference.conf",
                     units / "spotguard-gate.service.d/10-inference.conf")
        shutil.copy2(E2E / "gate-engine.service", units / "vllm.service")
        shutil.copy2(E2E / "gate-driver.service", units / "e2e-driver.service")
        for name in ("stream_engine.py", "restart_driver.py"):
            shutil.copy2(E2E / name, shared / name)
    etc = tmp_path / "etc"
    shutil.copytree(installed.root / "etc/spotguard", etc)
    if config is not None:
        (etc / "spotguard.toml").write_text(config)
    args = [nspawn, "--quiet", "--directory=/", "--volatile=yes", "--register=no", "--keep-unit",
            "--private-network", f"--machine=sg-{uuid.uuid4().hex[:12]}",
            f"--bind={shared}:/e2e", f"--bind-ro={units}:/etc/systemd/system",
            f"--bind-ro={installed.root / 'opt/spotguard'}:/opt/spotguard", f"--bind-ro={etc}:/etc/spotguard",
            "--boot", "--", "systemd.unit=e2e.target", "systemd.firstboot=off"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the container did not power off within 120 s: {exc.stdout!r}") from None
    console = done.stdout + done.stderr
    if "Failed to create" in console and "cgroup" in console and not (shared / "events.log").exists():
        pytest.skip(f"systemd cannot run as PID 1 in a container here: {console[-1000:]}")
    assert (shared / "events.log").exists(), console
    return shared / "events.log", console


def test_shutdown_drains_spotguard_before_the_engine_stops(installed: Installed, tmp_path: Path) -> None:
    log, console = boot(installed, tmp_path, [E2E / "30-standin.conf"])
    rows = events(log)
    names = [text.split()[0] for _, text in rows]
    assert names == ["engine-start", "spotguard-ready", "driver", "spotguard-drain-start", "engine-sigusr1",
                     "spotguard-drained", "engine-sigterm"], (rows, console)
    texts = dict((text.split()[0], text) for _, text in rows)
    # Type=notify: the driver (After=spotguard) ran only once READY=1 had arrived; the watchdog is on.
    assert texts["driver"] == "driver active active", console
    assert texts["spotguard-ready"] == "spotguard-ready watchdog=15.0"
    # The drain saw the engine alive from start to end; the engine got SIGTERM only afterwards.
    assert texts["spotguard-drain-start"].endswith("engine-alive=True")
    assert texts["spotguard-drained"].endswith("engine-alive=True")
    stamps = {text.split()[0]: stamp for stamp, text in rows if stamp}
    assert stamps["engine-sigterm"] >= stamps["spotguard-drained"]


REAL_CONFIG = """\
[agent]
cloud = "none"
log_format = "json"

[http]
listen = "127.0.0.1:9901"

[shutdown]
budget = 10.0

[server]
kind = "command"
stop_command = ["/bin/sh", "-c", "echo \\"$(cut -d' ' -f1 /proc/uptime) daemon-stop-command engine-alive=$(test -d /proc/$(cat /e2e/engine.pid) && echo True || echo False)\\" >> /e2e/events.log"]
inflight_command = ["/bin/echo", "0"]
"""


def test_real_daemon_drains_on_shutdown_before_the_engine_stops(installed: Installed, tmp_path: Path) -> None:
    # A module the wheel leaves out is the regression this test exists for: it must fail here, not skip.
    probe = subprocess.run([str(installed.root / "opt/spotguard/venv/bin/python"), "-c", "import spotguard.agent.daemon"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0, f"the installed daemon does not import: {probe.stderr.strip()[-2000:]}"
    log, console = boot(installed, tmp_path, [], config=REAL_CONFIG)
    names = [text.split()[0] for _, text in events(log)]
    assert "daemon-stop-command" in names, console[-4000:]
    assert names.index("driver") < names.index("daemon-stop-command") < names.index("engine-sigterm"), console
    assert any(text == "daemon-stop-command engine-alive=True" for _, text in events(log))


GATE_CONFIG = """\
[agent]
cloud = "none"
log_format = "json"

[http]
listen = "127.0.0.1:9901"

[gate]
listen = "127.0.0.1:8000"
upstream = "http://127.0.0.1:8080"
"""


def test_restarting_spotguard_leaves_a_stream_through_the_gate_intact(installed: Installed, tmp_path: Path) -> None:
    log, console = boot(installed, tmp_path, [], config=GATE_CONFIG, gate=True)
    texts = {text.split()[0]: text for _, text in events(log)}
    assert texts.get("stream-started") == "stream-started status=200 first=True", console[-4000:]
    # spotguard.service came back as a new process; the gate (its own unit) is the same process throughout.
    assert texts.get("restarted") == "restarted daemon-new-pid=True gate-same-pid=True active=active", console[-4000:]
    # 60 tokens and [DONE]: nothing cut, nothing lost.
    assert texts.get("stream-ended") == "stream-ended events=61 done=True", console[-4000:]


def test_a_restart_on_a_running_system_does_not_drain_but_the_shutdown_after_it_does(
        installed: Installed, tmp_path: Path) -> None:
    # `systemctl restart spotguard` (every upgrade) is not an eviction: the engine keeps its work. The
    # machine's shutdown a moment later is one, and drains as before.
    log, console = boot(installed, tmp_path, [], config=REAL_CONFIG, driver=E2E / "e2e-driver-restart.service")
    rows = events(log)
    names = [text.split()[0] for _, text in rows]
    assert "driver-restarted" in names, console[-4000:]
    restarted = next(text for _, text in rows if text.startswith("driver-restarted"))
    assert restarted.split()[1] == "active", restarted  # the new daemon came back (Type=notify: READY=1)
    assert names.count("daemon-stop-command") == 1, (rows, console[-4000:])
    assert names.index("driver-restarted") < names.index("daemon-stop-command") < names.index("engine-sigterm")
