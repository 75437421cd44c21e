"""bench/fleet.py's fleet: vLLM-like engines, spotguard nodes (daemon + gate + engine), HAProxy in front.

Every process is started through ``spotguard.demo.processes.Processes`` (own session, log file, stopped at
the end); the gates the daemons start are adopted so they are stopped too.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from spotguard.config import Config, to_toml
from spotguard.demo.node import fleet_key
from spotguard.demo.processes import Processes, free_port, wait_http
from spotguard.gate.control import call

SPOTGUARD = Path(sys.executable).with_name("spotguard")
BACKEND = "nodes"


@dataclass(frozen=True)
class Health:
    """HAProxy's active checks: every ``inter_s``, DOWN after ``fall`` failures, UP after ``rise`` successes."""

    inter_s: float = 1.0
    fall: int = 3
    rise: int = 2


@dataclass(frozen=True)
class EngineProcess:
    url: str
    proc: subprocess.Popen[bytes]
    count_file: Path

    def generated(self) -> int:
        """Tokens it generated so far (also after it was killed: the file outlives it)."""
        text = self.count_file.read_text().strip() if self.count_file.exists() else ""
        return int(text) if text else 0


@dataclass
class Node:
    """One VM: an engine, and with spotguard its daemon and the gate the daemon started."""

    name: str
    engine: EngineProcess
    serve_port: int
    """Where HAProxy sends requests: the gate's port, or the engine's without spotguard."""
    check_port: int
    check_uri: str
    daemon: subprocess.Popen[bytes] | None = None
    daemon_url: str = ""
    control_socket: str = ""
    gate_socket: str = ""
    gate_pid: int = 0

    def kill(self) -> None:
        """The VM is gone: SIGKILL every process of the node at once (daemon first, so it starts nothing)."""
        for pid in (self.daemon.pid if self.daemon else 0, self.gate_pid, self.engine.proc.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in (self.daemon, self.engine.proc):
            if proc is not None:
                proc.wait(timeout=5)


async def start_engine(procs: Processes, work: Path, name: str, *, tokens_per_s: float,
                       shutdown_timeout: float) -> EngineProcess:
    port = free_port()
    count_file = work / f"{name}.generated"
    proc = procs.start(name, [sys.executable, "-m", "bench._vllm_like", "--port", str(port),
                              "--tokens-per-second", str(tokens_per_s), "--shutdown-timeout", str(shutdown_timeout),
                              "--count-file", str(count_file)],
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/health", proc, f"engine {name}", procs.logs / f"{name}.log", timeout=60)
    return EngineProcess(url, proc, count_file)


def plain_node(name: str, engine: EngineProcess) -> Node:
    """A node without spotguard: HAProxy talks to the engine and checks its /health (200 while it drains)."""
    port = int(engine.url.rsplit(":", 1)[1])
    return Node(name, engine, serve_port=port, check_port=port, check_uri="/health")


def node_config(work: Path, name: str, engine: EngineProcess, *, http_port: int, gate_port: int, lb_url: str,
                store: Path, safety_margin: float | None = None) -> Config:
    """What an operator following docs/operations.md writes for one node, on loopback."""
    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    config = (Config()
            .replace("agent", cloud="none", state_dir=str(home / "state"), log_format="json",
                     log_level=os.environ.get("BENCH_LOG_LEVEL", "info"), instance_id=f"fleet-{name}")
            .replace("http", listen=f"127.0.0.1:{http_port}")
            .replace("control", socket=str(home / "control.sock"))
            # the bench stops the surviving nodes at the end of a round: that is not an eviction
            .replace("shutdown", enabled=False)
            .replace("server", kind="vllm", url=engine.url, pid=engine.proc.pid)
            .replace("gate", listen=f"127.0.0.1:{gate_port}", upstream=engine.url, peers=[lb_url])
            .replace("snapshot", url=f"file://{store}")
            .replace("resume", key_file=str(fleet_key(work))))
    return config.replace("drain", safety_margin=safety_margin) if safety_margin is not None else config


async def start_spotguard_node(procs: Processes, work: Path, name: str, engine: EngineProcess, *, lb_url: str,
                               store: Path, safety_margin: float | None = None) -> Node:
    """``spotguard run`` for ``engine``; returns once its /readyz says 200 (its gate is up then)."""
    http_port, gate_port = free_port(), free_port()
    config = node_config(work, name, engine, http_port=http_port, gate_port=gate_port, lb_url=lb_url, store=store,
                         safety_margin=safety_margin)
    path = work / name / "spotguard.toml"
    path.write_text(to_toml(config))
    daemon = procs.start(f"{name}-daemon", [str(SPOTGUARD), "run", "--config", str(path)],
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{http_port}"
    await wait_http(url + "/readyz", daemon, f"spotguard run ({name})", procs.logs / f"{name}-daemon.log",
                    timeout=90)
    gate_socket = str(work / name / "gate.sock")
    hello = await call(gate_socket, "hello", timeout=5.0)
    procs.adopt(f"{name}-gate", int(hello["pid"]))
    return Node(name, engine, serve_port=gate_port, check_port=http_port, check_uri="/readyz", daemon=daemon,
                daemon_url=url, control_socket=config.control.socket, gate_socket=gate_socket,
                gate_pid=int(hello["pid"]))


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if found is None:
        raise SystemExit("bench/fleet.py needs HAProxy: run `make tools` (tools/setup-bench-tools.sh installs "
                         "the Debian package haproxy) or `apt-get install haproxy`")
    return found


def haproxy_config(port: int, stats_socket: Path, nodes: list[Node], health: Health) -> str:
    """Round robin over the nodes, active checks on each node's check URI, one retry elsewhere."""
    servers = "\n".join(
        f"    server {n.name} 127.0.0.1:{n.serve_port} check port {n.check_port} "
        f"inter {int(health.inter_s * 1000)}ms fall {health.fall} rise {health.rise}" for n in nodes)
    uris = {n.check_uri for n in nodes}
    if len(uris) != 1:
        raise ValueError(f"the nodes check different URIs: {sorted(uris)}")
    return f"""global
    stats socket {stats_socket} mode 600 level admin
    nbthread 1
    maxconn 2000

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 30s
    retries 1
    option redispatch

frontend fleet
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk
    http-check send meth GET uri {uris.pop()}
{servers}
"""


@dataclass(frozen=True)
class Balancer:
    url: str
    stats_socket: Path

    async def admin(self, command: str) -> str:
        """One command on HAProxy's runtime API (the stats socket); its whole answer."""
        with anyio.fail_after(5):
            async with await anyio.connect_unix(str(self.stats_socket)) as stream:
                await stream.send(command.encode() + b"\n")
                chunks = []
                try:
                    while True:
                        chunks.append(await stream.receive())
                except anyio.EndOfStream:
                    pass
        return b"".join(chunks).decode()

    async def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2``, ...)."""
        text = (await self.admin("show stat")).lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND")}

    async def set_weight(self, server: str, weight: int) -> None:
        answer = await self.admin(f"set server {BACKEND}/{server} weight {weight}")
        if answer.strip():
            raise RuntimeError(f"HAProxy refused a weight change for {server}: {answer.strip()}")


async def start_balancer(procs: Processes, work: Path, port: int, nodes: list[Node], health: Health) -> Balancer:
    """HAProxy in the foreground (``haproxy -db -f FILE``); returns once every node is UP."""
    binary = haproxy_binary()
    stats = work / "haproxy.sock"
    config = work / "haproxy.cfg"
    config.write_text(haproxy_config(port, stats, nodes, health))
    proc = procs.start("haproxy", [binary, "-db", "-f", str(config)])
    balancer = Balancer(f"http://127.0.0.1:{port}", stats)
    with anyio.fail_after(30):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {proc.returncode}; see {procs.logs / 'haproxy.log'}")
            try:
                if all(state == "UP" for state in (await balancer.states()).values()):
                    return balancer
            except OSError:
                pass  # the stats socket is not there yet
            await anyio.sleep(0.1)  # health checks run once a second; bounded by fail_after
