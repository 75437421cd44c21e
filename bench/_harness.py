"""Shared bench plumbing: a daemon subprocess on loopback, the in-process emulator, percentiles."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from spotguard.config import Config, to_toml
from spotguard.control import client as control

REPO = Path(__file__).resolve().parent.parent
SPOTGUARD = Path(sys.executable).with_name("spotguard")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": statistics.median(values), "p99": percentile(values, 99),
            "min": min(values), "max": max(values)}


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto_server on a free loopback port, up and answering; returns the process and its URL."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.1)  # bounded by the deadline: process start-up


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    url: str
    config: Path
    socket: str
    spawned_at: float


@contextmanager
def daemon(sections: dict[str, dict[str, Any]]) -> Iterator[DaemonProcess]:
    """``spotguard run`` as a real process with its own state dir, listener and control socket."""
    with tempfile.TemporaryDirectory(prefix="spotguard-bench-") as tmp:
        port = free_port()
        sock = f"{tmp}/control.sock"
        merged = {
            "agent": {"state_dir": f"{tmp}/state", "log_format": "json", "log_level": os.environ.get("BENCH_LOG_LEVEL", "warning")},
            "http": {"listen": f"127.0.0.1:{port}"},
            "control": {"socket": sock},
        }
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        effective = Config()
        for name, values in merged.items():
            effective = effective.replace(name, **values)
        config = Path(tmp) / "spotguard.toml"
        config.write_text(to_toml(effective))
        log = open(Path(tmp) / "daemon.log", "wb")
        spawned = time.perf_counter()
        proc = subprocess.Popen([str(SPOTGUARD), "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield DaemonProcess(proc, f"http://127.0.0.1:{port}", config, sock, spawned)
        except BaseException:
            # a failed trial is only debuggable with what the daemon said; the temp dir goes away below
            log.flush()
            tail = (Path(tmp) / "daemon.log").read_text(errors="replace").splitlines()[-40:]
            print("daemon log (last 40 lines):", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
            # A gate the daemon started outlives it (by design): stop it once the daemon, which would
            # start it again, is gone.
            stop_gate(f"{tmp}/gate.sock")
            log.close()


def stop_gate(path: str) -> None:
    """Ask the gate answering on ``path`` (if any) to stop, and wait until it has gone."""
    import json

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b'{"op": "hello"}\n')
            pid = int(json.loads(sock.makefile("rb").readline())["pid"])
            sock.sendall(b'{"op": "stop"}\n')
    except (OSError, ValueError, KeyError):
        return
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)  # bounded by the deadline: the gate finishes what is in flight
    os.kill(pid, 9)


async def wait_status(client: httpx.AsyncClient, url: str, status: int, timeout: float = 10.0,
                      interval: float = 0.002) -> float:
    """Poll ``url`` until it answers ``status``; returns perf_counter() of the first such answer."""
    with anyio.fail_after(timeout):
        while True:
            try:
                response = await client.get(url)
                if response.status_code == status:
                    return time.perf_counter()
            except httpx.TransportError:
                pass
            await anyio.sleep(interval)


async def back_to_serving(http: httpx.AsyncClient, d: DaemonProcess, withdraw: Callable[[], Awaitable[None]]) -> None:
    """End a trial: withdraw its notice, wait until the daemon has seen it go, undrain, wait for /readyz 200.

    Waiting for the withdrawal matters: a forced undrain ignores the notices still live at that moment
    until they go away, and the next trial's notice can carry the same id (AWS's instance-action has
    whole-second times), so the daemon must see the old one leave first.
    """
    await withdraw()
    with anyio.fail_after(30):
        while (await http.get(d.url + "/status")).json()["live_notices"]:
            await anyio.sleep(0.01)
        while (await control.undrain(d.socket, force=True)).get("state") != "serving":
            await anyio.sleep(0.01)
    await wait_status(http, d.url + "/readyz", 200, timeout=10)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
