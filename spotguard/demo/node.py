"""The demo's configuration files: the node (the daemon, the gate in front of replica 1, replica 2's gate as
its peer, ELBv2 on moto, a file:// snapshot store, a webhook receiver) and replica 2's gate; one resume key
for both gates. All on loopback."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from spotguard.demo.balancer import TargetGroup
from spotguard.demo.engines import Engine


@dataclass(frozen=True)
class Node:
    config: Path
    url: str
    """The daemon's /readyz, /status."""
    gate: str
    gate_socket: Path
    store: Path


def _q(value: object) -> str:
    return json.dumps(value)


def fleet_key(workdir: Path) -> Path:
    """The fleet's resume secret (``[resume] key_file``): the same file for every gate of the demo."""
    path = workdir / "resume.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(32))
    return path


def server_section(engine: Engine) -> str:
    if engine.kind == "llama-server":
        return f'kind = "llamacpp"\nurl = {_q(engine.url)}'
    # the stand-in drains like vLLM does on SIGTERM: no new work, running requests finish
    return (f'kind = "command"\nhealth_url = {_q(engine.url + "/health")}\n'
            f'stop_command = ["kill", "-TERM", "{engine.proc.pid}"]')


def write_peer_gate(workdir: Path, *, gate_port: int, engine: Engine, key: Path) -> Path:
    """The second replica's gate (``spotguard gate`` alone): the peer that takes answers over and holds them."""
    home = workdir / "replica-2"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "gate.toml"
    config.write_text(f"""# replica 2's gate: it takes answers over from replica 1 and holds them for their clients.
[agent]
state_dir = {_q(str(home / "state"))}
log_format = "json"
instance_id = "replica-2"

[control]
socket = {_q(str(home / "control.sock"))}

[server]
{server_section(engine)}

[gate]
listen = "127.0.0.1:{gate_port}"
upstream = {_q(engine.url)}

[resume]
key_file = {_q(str(key))}
""")
    return config


def write_node(workdir: Path, *, emulator: str, http_port: int, gate_port: int, engine: Engine, peer_gate: str,
               group: TargetGroup | None, webhook: str, wait_budget: float, key: Path) -> Node:
    state, store = workdir / "state", workdir / "snapshots"
    store.mkdir(parents=True, exist_ok=True)
    server = server_section(engine)
    snapshot_extra = ""
    if engine.kind == "llama-server":
        snapshot_extra = f"slot_save_path = {_q(str(engine.slots))}\nmodel_path = {_q(str(engine.model))}"
    peers = f"peers = [{_q(peer_gate)}]"
    aws = ""
    if group is not None:
        aws = (f"endpoint_url = {_q(group.moto_url)}\nregion = \"us-east-1\"\ntarget_group_arns = [{_q(group.arn)}]\n"
               f"target_port = {gate_port}")
    text = f"""# spotguard demo node: everything on loopback, nothing in any cloud.
[agent]
cloud = "aws"
state_dir = {_q(str(state))}
log_format = "json"
instance_id = {_q(group.instance_id if group else "i-demo")}

[http]
listen = "127.0.0.1:{http_port}"

[control]
socket = {_q(str(workdir / "control.sock"))}

[shutdown]
enabled = false  # the demo stops the daemon itself at the end: that is not an eviction

[aws]
metadata_url = {_q(emulator)}
{aws}

[drain]
safety_margin = 2.0
wait_inflight_budget = {wait_budget}

[server]
{server}

[gate]
listen = "127.0.0.1:{gate_port}"
upstream = {_q(engine.url)}
stop_timeout = 2.0
{peers}

[snapshot]
url = {_q("file://" + str(store))}
{snapshot_extra}

[resume]
key_file = {_q(str(key))}

[webhook]
urls = [{_q(webhook)}]
"""
    config = workdir / "spotguard.toml"
    config.write_text(text)
    return Node(config, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gate_port}", workdir / "gate.sock",
                store)
