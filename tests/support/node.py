"""A whole node for rehearsal tests: the real daemon (``spotguard run``) with the gate in front of a real
llama-server, ELBv2 on moto, a file:// snapshot store and the metadata emulator, all on loopback.

``node_config`` writes the configuration (and the moto target group the daemon deregisters from);
``running_node`` starts the daemon with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support._daemon import Daemon, daemon, system_state_env, write_config
from tests.support.emulator import RunningEmulator
from tests.support.llama import LlamaServer
from tests.support.moto import MOTO_ENV, free_port

REGION = "us-east-1"
NodeConfig = tuple[Path, str, str, str, Any]
"""(config file, spotguard's URL, the gate's URL, target group ARN, (instance id, elbv2 client, store dir))."""


@dataclass(frozen=True)
class Node:
    daemon: Daemon
    gate: str
    target_group: str
    instance_id: str
    elbv2: Any
    store: Path

    def registered(self) -> list[str]:
        answer = self.elbv2.describe_target_health(TargetGroupArn=self.target_group)["TargetHealthDescriptions"]
        return [d["Target"]["Id"] for d in answer if d["TargetHealth"]["State"] not in ("draining", "unused")]


def _target_group(moto_url: str, port: int) -> tuple[str, str, Any]:
    """A VPC, one instance registered in one target group on ``port``: what the daemon deregisters."""
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name=REGION)
    elbv2 = boto3.client("elbv2", endpoint_url=moto_url, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet)
    instance_id = instance["Instances"][0]["InstanceId"]
    group = elbv2.create_target_group(Name=f"llm-{port}", Protocol="HTTP", Port=port, VpcId=vpc,
                                      TargetType="instance")
    arn = group["TargetGroups"][0]["TargetGroupArn"]
    elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": instance_id, "Port": port}])
    return arn, instance_id, elbv2


@pytest.fixture
def node_config(tmp_path: Path, emulator: RunningEmulator, moto_reset: str,
                llama_server: LlamaServer) -> Iterator[NodeConfig]:
    gate_port, http_port = free_port(), free_port()
    arn, instance_id, elbv2 = _target_group(moto_reset, gate_port)
    store = tmp_path / "snapshots"
    store.mkdir()
    config = write_config(tmp_path, "aws", emulator.url, http_port, agent=f'instance_id = "{instance_id}"', extra=f"""
endpoint_url = "{moto_reset}"
region = "{REGION}"
target_group_arns = ["{arn}"]
target_port = {gate_port}
[drain]
safety_margin = 1.0
[server]
kind = "llamacpp"
url = "{llama_server.url}"
[gate]
listen = "127.0.0.1:{gate_port}"
upstream = "{llama_server.url}"
[snapshot]
url = "file://{store}"
slot_save_path = "{llama_server.slot_save_path}"
""")
    yield config, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gate_port}", arn, (instance_id, elbv2, store)


@contextmanager
def running_node(tmp_path: Path, node_config: NodeConfig, *,
                 machine: str = "stopping") -> Iterator[Node]:
    config, url, gate, arn, (instance_id, elbv2, store) = node_config
    env = {**system_state_env(tmp_path, machine), **MOTO_ENV}
    with daemon(config, tmp_path / "daemon.log", url, env=env) as running:
        yield Node(running, gate, arn, instance_id, elbv2, store)
