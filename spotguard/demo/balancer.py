"""An ELBv2 target group on a loopback moto server, with this "instance" registered in it: what the daemon
deregisters from. Needs ``moto[server]`` and boto3 (``make setup`` installs both)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from spotguard.demo.processes import Processes, free_port, wait_http

REGION = "us-east-1"
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": REGION}
"""Credentials moto accepts; the daemon gets them (and no others) in its environment."""


@dataclass(frozen=True)
class TargetGroup:
    moto_url: str
    arn: str
    instance_id: str
    port: int
    elbv2: Any

    def registered(self) -> list[str]:
        answer = self.elbv2.describe_target_health(TargetGroupArn=self.arn)["TargetHealthDescriptions"]
        return [d["Target"]["Id"] for d in answer if d["TargetHealth"]["State"] not in ("draining", "unused")]


def moto_server() -> Path | None:
    beside = Path(sys.executable).with_name("moto_server")
    if beside.is_file():
        return beside
    found = shutil.which("moto_server")
    return Path(found) if found else None


async def start_target_group(procs: Processes, port: int) -> TargetGroup | str:
    """A moto server and a target group holding one instance on ``port``; or why there is none."""
    binary = moto_server()
    try:
        import boto3
    except ImportError:
        return "boto3 is not installed (pip install 'spotguard[aws]')"
    if binary is None:
        return "moto_server is not installed (pip install 'moto[server]')"
    moto_port = free_port()
    url = f"http://127.0.0.1:{moto_port}"
    proc = procs.start("moto", [str(binary), "-H", "127.0.0.1", "-p", str(moto_port)])
    await wait_http(url + "/moto-api/", proc, "moto_server", procs.logs / "moto.log", want=None)
    return await anyio.to_thread.run_sync(_create, boto3, url, port)


def _create(boto3: Any, url: str, port: int) -> TargetGroup:
    keys = {"aws_access_key_id": MOTO_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": MOTO_ENV["AWS_SECRET_ACCESS_KEY"]}
    ec2 = boto3.client("ec2", endpoint_url=url, region_name=REGION, **keys)
    elbv2 = boto3.client("elbv2", endpoint_url=url, region_name=REGION, **keys)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet)
    instance_id = instance["Instances"][0]["InstanceId"]
    group = elbv2.create_target_group(Name="llm-demo", Protocol="HTTP", Port=port, VpcId=vpc, TargetType="instance")
    arn = group["TargetGroups"][0]["TargetGroupArn"]
    elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": instance_id, "Port": port}])
    return TargetGroup(url, arn, instance_id, port, elbv2)
