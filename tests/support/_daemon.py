"""``spotguard run`` as a real process for end-to-end tests: its config, its life, and bounded waits on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))
START_TIMEOUT = 30.0
"""Python start-up of the daemon on a busy 2-core machine; a healthy start takes well under a second."""


def write_config(tmp: Path, cloud: str, emulator_url: str, port: int, extra: str = "",
                 name: str = "spotguard.toml", shutdown: str = "", agent: str = "") -> Path:
    """A daemon config on loopback: ``extra`` is more TOML (sections not already written here);
    ``shutdown`` and ``agent`` are more keys for those sections."""
    path = tmp / name
    vm = '\nvm_name = "spotguard-vm"' if cloud == "azure" else ""
    cloud_section = f'[{cloud}]\nmetadata_url = "{emulator_url}"{vm}' if cloud != "none" else ""
    path.write_text(f"""
[agent]
cloud = "{cloud}"
state_dir = "{tmp}/state"
log_format = "json"
{agent}
[http]
listen = "127.0.0.1:{port}"
[control]
socket = "{tmp}/control.sock"
[shutdown]
budget = 10.0
{shutdown}
{cloud_section}
{extra}
""")
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    config: Path

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return "(no daemon log)"

    async def wait_exit(self, timeout: float) -> int:
        with anyio.fail_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.02)
        return self.proc.returncode

    async def status(self, http: httpx.AsyncClient) -> dict[str, Any]:
        doc: dict[str, Any] = (await http.get(self.url + "/status")).json()
        return doc

    async def until_status(self, http: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool],
                           timeout: float = 15.0) -> dict[str, Any]:
        try:
            with anyio.fail_after(timeout):
                while True:
                    try:
                        doc = await self.status(http)
                    except httpx.TransportError:  # still starting
                        doc = None
                    if doc is not None and predicate(doc):
                        return doc
                    await anyio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"status never matched within {timeout}s; daemon log:\n{self.log_tail()}") from None

    async def readyz(self, http: httpx.AsyncClient, want: int, timeout: float = START_TIMEOUT) -> str:
        """Wait until /readyz answers ``want``; returns its body."""
        try:
            with anyio.fail_after(timeout):
                while True:
                    try:
                        response = await http.get(self.url + "/readyz")
                        if response.status_code == want:
                            return response.text
                    except httpx.TransportError:
                        if self.proc.poll() is not None:
                            raise AssertionError(f"the daemon exited ({self.proc.returncode}):\n"
                                                 f"{self.log_tail()}") from None
                    await anyio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"/readyz never answered {want} within {timeout}s; daemon log:\n"
                                 f"{self.log_tail()}") from None

    def control(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``spotguard ARGS --config <this daemon's config>`` (drain, undrain, status) as an operator would."""
        return subprocess.run([SPOTGUARD, *args, "--config", str(self.config)], capture_output=True, text=True,
                              timeout=timeout, check=False)


def system_state_env(tmp: Path, answer: str) -> dict[str, str]:
    """An environment whose ``systemctl is-system-running`` answers ``answer`` (a real executable on PATH):
    what the daemon asks to tell a machine shutdown from a restart of its own unit."""
    bin_dir = tmp / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "systemctl"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = is-system-running ] && echo {answer} && exit 0\nexit 1\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


STARTED_CONFIGS: list[Path] = []
"""Configs of daemons started by the running test: their gate processes outlive them (by design) and are
stopped by the ``stop_gates`` fixture once the test ends."""


async def stop_gates() -> None:
    """SIGKILL every gate process that answers on the control socket of a daemon this test started."""
    from spotguard.config import load
    from spotguard.errors import GateError
    from spotguard.gate.control import call, control_path

    while STARTED_CONFIGS:
        config = STARTED_CONFIGS.pop()
        try:
            pid = int((await call(control_path(load(config, environ={})), "hello", timeout=2))["pid"])
        except (GateError, OSError, ValueError, KeyError):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def daemon(config: Path, log: Path, url: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """Start ``spotguard run``; SIGKILL it at the end if it is still running (its gate: see ``stop_gates``)."""
    STARTED_CONFIGS.append(config)
    with open(log, "ab") as out:
        proc = subprocess.Popen([SPOTGUARD, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        yield Daemon(proc=proc, url=url, log=log, config=config)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
