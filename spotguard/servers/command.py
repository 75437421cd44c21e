"""kind = command: run an argv (never a shell) to stop the engine, and optionally one printing its count."""

from __future__ import annotations

from spotguard.errors import ConfigError, EngineError, ManualActionRequired
from spotguard.servers.process import run_command


class CommandAdapter:
    name = "command"

    def __init__(self, *, stop_command: tuple[str, ...], inflight_command: tuple[str, ...],
                 timeout: float) -> None:
        if not stop_command:
            raise ConfigError("[server] stop_command must be set for kind = command (an argv list)")
        self.stop_command = stop_command
        self.inflight_command = inflight_command
        self.timeout = timeout

    async def stop_accepting(self, *, dry_run: bool) -> str:
        shown = " ".join(self.stop_command)
        if dry_run:
            return f"would run {shown}"
        result = await run_command(self.stop_command, timeout=self.timeout, what="[server] stop_command")
        if result.returncode != 0:
            raise EngineError(f"[server] stop_command {self.stop_command[0]} exited {result.returncode}: "
                              f"{result.stderr_tail()}")
        return f"ran {shown}: exit 0"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        message = (f"the engine was stopped by [server] stop_command ({self.stop_command[0]}) and spotguard has no "
                   "command to start it: restart the engine by hand")
        if dry_run:
            return f"would not restart: {message}"
        raise ManualActionRequired(message)

    async def inflight(self) -> int | None:
        if not self.inflight_command:
            return None
        result = await run_command(self.inflight_command, timeout=self.timeout,
                                   what="[server] inflight_command")
        if result.returncode != 0:
            raise EngineError(f"[server] inflight_command {self.inflight_command[0]} exited "
                              f"{result.returncode}: {result.stderr_tail()}")
        text = result.stdout.strip()
        if not (text.isascii() and text.isdigit()):
            raise EngineError(f"[server] inflight_command printed {text[:40]!r}, not a whole number")
        return int(text)
