"""Finding and signalling the engine process: pid, pid file, systemd unit; real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from spotguard.errors import ConfigError, EngineError, ManualActionRequired
from spotguard.servers.process import ProcessTarget, Signaller, parse_signal, run_command

pytestmark = pytest.mark.anyio

# Writes the name of each signal it gets to argv[1], exits on SIGTERM.
TARGET = """
import signal, sys, time
out = open(sys.argv[1], "a", buffering=1)
def got(sig, frame):
    out.write(signal.Signals(sig).name + "\\n")
    if sig == signal.SIGTERM:
        sys.exit(0)
signal.signal(signal.SIGTERM, got)
signal.signal(signal.SIGHUP, got)
out.write("ready\\n")
time.sleep(120)
"""

class Target:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    async def received(self, count: int = 1) -> list[str]:
        with anyio.fail_after(10):
            while len(lines := self.log.read_text().split()[1:]) < count:
                await anyio.sleep(0.02)
        return lines


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    log = tmp_path / "signals.log"
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(log)])
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().startswith("ready")):
        assert proc.poll() is None and time.monotonic() < deadline, "target did not start"
        time.sleep(0.02)  # bounded by the deadline: process start-up, not a test wait
    yield Target(proc, log)
    proc.kill()
    proc.wait(timeout=10)


def signaller(sig: str = "SIGTERM", timeout: float = 5.0, **where: object) -> Signaller:
    return Signaller(target=ProcessTarget(**where), signal=parse_signal(sig), timeout=timeout)  # type: ignore[arg-type]


async def test_signal_by_pid(target: Target) -> None:
    with anyio.fail_after(10):
        assert await signaller("HUP", pid=target.proc.pid).send(dry_run=True) == \
            f"would send SIGHUP to pid {target.proc.pid}"
        assert await signaller("HUP", pid=target.proc.pid).send(dry_run=False) == \
            f"sent SIGHUP to pid {target.proc.pid}"
        assert await target.received() == ["SIGHUP"]
        assert await signaller(pid=target.proc.pid).alive() is True


async def test_signal_by_pid_file(target: Target, tmp_path: Path) -> None:
    pid_file = tmp_path / "engine.pid"
    pid_file.write_text(f"{target.proc.pid}\n")
    with anyio.fail_after(10):
        detail = await signaller(pid_file=str(pid_file)).send(dry_run=False)
        assert detail == f"sent SIGTERM to pid {target.proc.pid} (pid file {pid_file})"
        assert await target.received() == ["SIGTERM"]
        while target.proc.poll() is None:
            await anyio.sleep(0.02)
        assert await signaller(pid_file=str(pid_file)).alive() is False


async def test_exited_and_zombie_processes_are_gone(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    with anyio.fail_after(10):
        while not Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            await anyio.sleep(0.02)  # exited, not reaped: a zombie still accepts kill(), but is gone
        with pytest.raises(EngineError, match=f"pid {proc.pid} names no running process .engine gone.; SIGTERM not sent"):
            await signaller(pid=proc.pid).send(dry_run=False)
        assert await signaller(pid=proc.pid).alive() is False
        proc.wait()
        with pytest.raises(EngineError, match="names no running process"):
            await signaller(pid=proc.pid).send(dry_run=True)


async def test_pid_file_problems(target: Target, tmp_path: Path) -> None:
    pid_file = tmp_path / "engine.pid"
    with anyio.fail_after(10):
        with pytest.raises(EngineError, match="does not exist .engine not running, or fix \\[server\\] pid_file"):
            await signaller(pid_file=str(pid_file)).send(dry_run=False)
        pid_file.write_text("vllm\n")
        with pytest.raises(EngineError, match="does not hold a process id .starts with 'vllm'"):
            await signaller(pid_file=str(pid_file)).send(dry_run=False)
        # A pid file written an hour before its process started: the pid was reused by someone else.
        pid_file.write_text(str(target.proc.pid))
        os.utime(pid_file, (time.time() - 3600, time.time() - 3600))
        with pytest.raises(EngineError, match="is stale: pid .* started .*s after the file was written"):
            await signaller(pid_file=str(pid_file)).send(dry_run=False)
    assert target.log.read_text().split()[1:] == []


async def test_never_signals_init_or_itself() -> None:
    with anyio.fail_after(10):
        for pid in (1, os.getpid()):
            with pytest.raises(EngineError, match=f"names pid {pid}, which spotguard never signals"):
                await signaller(pid=pid).send(dry_run=False)


def test_not_ours(target: Target) -> None:
    """A process we may not signal (here: ours is root's, the signaller runs as nobody) is a clear error."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop to another user")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            anyio.run(lambda: signaller(pid=target.proc.pid).send(dry_run=False))
            message = "sent"
        except EngineError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {exc!r}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    assert message == (f"pid {target.proc.pid} is not ours: spotguard (uid 65534) may not signal it; run spotguard "
                       "as the engine's user or root, or set [server] unit")


async def test_systemd_unit(target: Target, systemctl: Path) -> None:
    (systemctl / "mainpid").write_text(str(target.proc.pid))
    unit = signaller(unit="vllm.service")
    with anyio.fail_after(20):
        assert await unit.send(dry_run=True) == f"would send SIGTERM to pid {target.proc.pid} (unit vllm.service)"
        assert target.log.read_text().split()[1:] == []
        assert await unit.send(dry_run=False) == \
            f"sent SIGTERM to pid {target.proc.pid} (unit vllm.service) through systemd"
        assert await target.received() == ["SIGTERM"]
    calls = [json.loads(line) for line in (systemctl / "systemctl.log").read_text().splitlines()]
    assert calls == [["show", "-p", "MainPID", "--value", "vllm.service"],
                     ["show", "-p", "MainPID", "--value", "vllm.service"],
                     ["kill", "--signal=SIGTERM", "--kill-who=main", "vllm.service"]]


async def test_systemd_unit_not_running_or_refusing(systemctl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (systemctl / "mainpid").write_text("0")
    with anyio.fail_after(20):
        with pytest.raises(EngineError, match="unit vllm.service names no running process"):
            await signaller(unit="vllm.service").send(dry_run=False)
        assert await signaller(unit="vllm.service").alive() is False
        monkeypatch.setenv("STUB_FAIL", "1")
        with pytest.raises(EngineError, match="systemctl show vllm.service exited 1: Failed to kill unit"):
            await signaller(unit="vllm.service").send(dry_run=False)
        assert await signaller(unit="vllm.service").alive() is None


async def test_start_the_unit_again(systemctl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (systemctl / "mainpid").write_text("0")
    unit = signaller(unit="vllm.service")
    with anyio.fail_after(20):
        assert await unit.start(dry_run=True) == "would run start --no-block vllm.service"
        with pytest.raises(EngineError, match="systemctl start vllm.service exited 5: .*Unit vllm.service not found"):
            await unit.start(dry_run=False)
        monkeypatch.setenv("STUB_START", json.dumps([sys.executable, "-c", "import time; time.sleep(60)"]))
        assert await unit.start(dry_run=False) == "queued systemctl start vllm.service"
        assert await unit.alive() is True
    calls = [json.loads(line) for line in (systemctl / "systemctl.log").read_text().splitlines()]
    assert calls[:2] == [["start", "--no-block", "vllm.service"]] * 2


async def test_no_unit_means_a_manual_restart(target: Target, tmp_path: Path) -> None:
    pid_file = tmp_path / "engine.pid"
    pid_file.write_text(str(target.proc.pid))
    with anyio.fail_after(10):
        for where in ({"pid": target.proc.pid}, {"pid_file": str(pid_file)}):
            detail = await signaller(**where).start(dry_run=True)
            assert detail.startswith("would not restart: the engine (")
            with pytest.raises(ManualActionRequired, match=r"stopped with SIGTERM and spotguard cannot start it: "
                                                           r"restart the engine by hand \(set \[server\] unit"):
                await signaller(**where).start(dry_run=False)
    assert target.log.read_text().split()[1:] == []  # nothing was signalled or started


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match=r"\[server\] stop_signal: 'SIGNOPE'"):
        parse_signal("SIGNOPE")
    assert parse_signal("term") is signal.SIGTERM
    assert parse_signal("2") is signal.SIGINT
    with pytest.raises(ConfigError, match=r"\[server\] unit"):
        ProcessTarget(unit="--all")
    with pytest.raises(ConfigError, match=r"\[server\] pid"):
        ProcessTarget(pid=-5)


async def test_nothing_configured() -> None:
    with anyio.fail_after(5), pytest.raises(EngineError, match="set \\[server\\] unit, pid_file or pid"):
        await signaller().send(dry_run=False)
    assert await signaller().alive() is None


async def test_run_command_caps_output() -> None:
    with anyio.fail_after(20):
        result = await run_command([sys.executable, "-c", "import sys; sys.stdout.write('y' * 5_000_000)"],
                                   timeout=10, what="test", max_output=1000)
    assert result.returncode == 0 and result.stdout == "y" * 1000


async def test_outer_cancellation_kills_the_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "cmd.pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    with anyio.fail_after(20):
        with anyio.move_on_after(1.5):  # the drain step's budget running out while the command runs
            await run_command([sys.executable, "-c", script], timeout=60, what="test")
        pid = int(pid_file.read_text())
        assert Path(f"/proc/{pid}").exists() is False
