"""Finding the engine's process from explicit configuration, signalling it, and running commands.

The process is never searched for by name: it is the main process of ``[server] unit``, the pid in
``[server] pid_file``, or ``[server] pid``, in that order. Every subprocess (systemctl, the command
adapter's argv) runs without a shell, in its own session, under a timeout that kills its whole group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

from spotguard.errors import ConfigError, EngineError, ManualActionRequired

MAX_OUTPUT_BYTES = 64 * 1024
"""What we keep of a command's stdout and stderr; the rest is read and dropped."""

PID_FILE_SLACK = 2.0
"""Seconds a process may appear to start after its pid file was written (clock granularity of /proc)."""


def parse_signal(name: str) -> signal.Signals:
    """``SIGTERM``, ``TERM`` or ``15`` -> the signal; else ConfigError naming ``[server] stop_signal``."""
    text = name.strip().upper()
    try:
        if text.isascii() and text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(f"[server] stop_signal: {name!r} is not a signal name like SIGTERM") from None


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def stderr_tail(self, limit: int = 300) -> str:
        text = self.stderr.strip()
        return text[-limit:] if text else "(no stderr)"


async def run_command(argv: Sequence[str], *, timeout: float, what: str,
                      max_output: int = MAX_OUTPUT_BYTES) -> CommandResult:
    """Run ``argv`` (no shell) to completion within ``timeout`` seconds; EngineError when it cannot.

    A non-zero exit status is returned, not raised: callers say what it means. On timeout the
    process group is killed, so children that kept the pipes open do not outlive us.
    """
    args = [str(part) for part in argv]
    if not args:
        raise EngineError(f"{what}: the command is empty")
    try:
        process = await anyio.open_process(args, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise EngineError(f"{what}: cannot run {args[0]!r}: {exc.strerror or exc}") from exc
    out, err = bytearray(), bytearray()
    try:
        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                tg.start_soon(_collect, process.stdout, out, max_output)
                tg.start_soon(_collect, process.stderr, err, max_output)
            returncode = await process.wait()
    except TimeoutError:
        raise EngineError(f"{what}: {args[0]} did not finish within {timeout:.1f}s (killed)") from None
    finally:
        if process.returncode is None:
            _kill_group(process.pid)
        with anyio.move_on_after(5, shield=True):
            await process.aclose()
    return CommandResult(tuple(args), returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def _collect(stream: ByteReceiveStream, into: bytearray, limit: int) -> None:
    async for chunk in stream:
        if len(into) < limit:
            into.extend(chunk[: limit - len(into)])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (or reaped and its group with it)


@dataclass(frozen=True, kw_only=True)
class ProcessTarget:
    """Where the engine's process is written down; the first non-empty one wins."""

    unit: str = ""
    pid_file: str = ""
    pid: int = 0

    def __post_init__(self) -> None:
        if self.unit.startswith("-"):
            raise ConfigError(f"[server] unit: {self.unit!r} is not a systemd unit name")
        if self.pid < 0:
            raise ConfigError(f"[server] pid: {self.pid} is not a process id")

    @property
    def configured(self) -> bool:
        return bool(self.unit or self.pid_file or self.pid)

    def describe(self) -> str:
        if self.unit:
            return f"unit {self.unit}"
        if self.pid_file:
            return f"pid file {self.pid_file}"
        return f"pid {self.pid}" if self.pid else "no process configured"


def process_state(pid: int) -> str | None:
    """The one-letter state from /proc (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"  # exists but unreadable: not our business to guess
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else "?"


def _start_time(pid: int) -> float | None:
    """Unix time the process started, from /proc; None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def read_pid_file(path: str) -> int | None:
    """The pid in ``path``, None when the file is gone (engine stopped); EngineError when it is garbage
    or older than the process it names."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(64)
        written = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EngineError(f"pid file {path} cannot be read: {exc.strerror or exc}") from exc
    text = raw.decode("ascii", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise EngineError(f"pid file {path} does not hold a process id (starts with {text[:20]!r})")
    pid = int(text)
    if process_state(pid) is None:
        return pid
    started = _start_time(pid)
    # A pid written before the process named by it started has been reused by someone else.
    if started is not None and started > written + PID_FILE_SLACK:
        raise EngineError(f"pid file {path} is stale: pid {pid} started {started - written:.0f}s after "
                          "the file was written, so it is another process now; not signalled")
    return pid


def running(pid: int, source: str) -> bool:
    """True when ``pid`` is a live process; EngineError for init and ourselves, which are never signalled."""
    if pid <= 1 or pid == os.getpid():
        raise EngineError(f"{source} names pid {pid}, which spotguard never signals")
    return process_state(pid) not in (None, "Z", "X")


@dataclass(frozen=True, kw_only=True)
class Signaller:
    """Delivers ``signal`` to the engine's main process, found from ``target``."""

    target: ProcessTarget
    signal: signal.Signals
    timeout: float
    systemctl: str = "systemctl"

    async def find(self) -> int | None:
        """The engine's pid now, None when it is not running; EngineError when it cannot be found out."""
        if self.target.unit:
            return await self._unit_pid()
        if self.target.pid_file:
            pid = read_pid_file(self.target.pid_file)
            return pid if pid is not None and running(pid, f"pid file {self.target.pid_file}") else None
        if self.target.pid:
            return self.target.pid if running(self.target.pid, "[server] pid") else None
        raise EngineError("no engine process configured: set [server] unit, pid_file or pid")

    async def _unit_pid(self) -> int | None:
        unit = self.target.unit
        result = await run_command([self.systemctl, "show", "-p", "MainPID", "--value", unit],
                                   timeout=self.timeout, what=f"systemctl show {unit}")
        if result.returncode != 0:
            raise EngineError(f"systemctl show {unit} exited {result.returncode}: {result.stderr_tail()}")
        text = result.stdout.strip()
        if not (text.isascii() and text.isdigit()):
            raise EngineError(f"systemctl show {unit}: MainPID is {text[:40]!r}, not a number")
        pid = int(text)
        return pid if pid and running(pid, f"unit {unit}") else None

    async def alive(self) -> bool | None:
        """Whether the engine process still runs; None when none is configured or it cannot tell."""
        if not self.target.configured:
            return None
        try:
            return await self.find() is not None
        except EngineError:
            return None

    async def send(self, *, dry_run: bool) -> str:
        """Send the signal (or, in a dry run, say to which process it would go)."""
        name = self.signal.name
        pid = await self.find()
        if pid is None:
            pid_file = self.target.pid_file
            missing = pid_file and not self.target.unit and not os.path.exists(pid_file)
            why = "does not exist (engine not running, or fix [server] pid_file)" if missing \
                else "names no running process (engine gone)"
            raise EngineError(f"{self.target.describe()} {why}; {name} not sent")
        found_by = self.target.unit or self.target.pid_file
        where = f"pid {pid} ({self.target.describe()})" if found_by else f"pid {pid}"
        if dry_run:
            return f"would send {name} to {where}"
        if self.target.unit:
            # systemd delivers it, so the unit's own bookkeeping sees the stop. --kill-who is the spelling
            # every systemd accepts; 252 renamed it --kill-whom and kept the old name as an alias.
            argv = [self.systemctl, "kill", f"--signal={name}", "--kill-who=main", self.target.unit]
            result = await run_command(argv, timeout=self.timeout, what=f"systemctl kill {self.target.unit}")
            if result.returncode != 0:
                raise EngineError(f"systemctl kill {self.target.unit} exited {result.returncode}: "
                                  f"{result.stderr_tail()}")
            return f"sent {name} to {where} through systemd"
        try:
            os.kill(pid, self.signal)
        except ProcessLookupError:
            raise EngineError(f"{self.target.describe()}: process {pid} is gone (not running); "
                              f"{name} not sent") from None
        except PermissionError:
            raise EngineError(f"pid {pid} is not ours: spotguard (uid {os.getuid()}) may not signal it; run "
                              "spotguard as the engine's user or root, or set [server] unit") from None
        return f"sent {name} to {where}"

    async def start(self, *, dry_run: bool) -> str:
        """Undo ``send``: start the unit again (``systemctl start --no-block``); ManualActionRequired without one.

        ``--no-block`` queues the start job and returns: a unit still stopping starts once it has stopped,
        and a model that loads for minutes does not hold the undrain; the engine's health check says when
        it serves again. A unit that cannot be started (unknown, masked) is refused at once.
        """
        unit = self.target.unit
        if not unit:
            message = (f"the engine ({self.target.describe()}) was stopped with {self.signal.name} and spotguard "
                       "cannot start it: restart the engine by hand (set [server] unit to let spotguard start it)")
            if dry_run:
                return f"would not restart: {message}"
            raise ManualActionRequired(message)
        argv = [self.systemctl, "start", "--no-block", unit]
        if dry_run:
            return f"would run {' '.join(argv[1:])}"
        result = await run_command(argv, timeout=self.timeout, what=f"systemctl start {unit}")
        if result.returncode != 0:
            raise EngineError(f"systemctl start {unit} exited {result.returncode}: {result.stderr_tail()}")
        return f"queued systemctl start {unit}"
