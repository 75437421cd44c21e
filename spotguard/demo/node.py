"""The demo node's configuration file: the daemon, the gate in front of replica 1, the second replica as the
gate's peer, ELBv2 on moto, a file:// snapshot store, a webhook receiver. All on loopback."""

from __future__ import annotations

import json
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


def write_node(workdir: Path, *, emulator: str, http_port: int, gate_port: int, engine: Engine, peer: Engine,
               group: TargetGroup | None, webhook: str, wait_budget: float) -> Node:
    state, store = workdir / "state", workdir / "snapshots"
    store.mkdir(parents=True, exist_ok=True)
    if engine.kind == "llama-server":
        server = f'kind = "llamacpp"\nurl = {_q(engine.url)}'
        snapshot_extra = f"slot_save_path = {_q(str(engine.slots))}\nmodel_path = {_q(str(engine.model))}"
    else:  # the stand-in drains like vLLM does on SIGTERM: no new work, running requests finish
        server = (f'kind = "command"\nhealth_url = {_q(engine.url + "/health")}\n'
                  f'stop_command = ["kill", "-TERM", "{engine.proc.pid}"]')
        snapshot_extra = ""
    peers = f"peers = [{_q(peer.url)}]"
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

[webhook]
urls = [{_q(webhook)}]
"""
    config = workdir / "spotguard.toml"
    config.write_text(text)
    return Node(config, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gate_port}", workdir / "gate.sock",
                store)
