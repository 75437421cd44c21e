"""Benchmark: deregistration latency against a real moto server on loopback.

    .venv/bin/python bench/deregister.py [--trials 60] [--cold-trials 20] [--groups 2]

Each trial registers this "instance" in the target groups and checks it is healthy, raises a spot
notice in the metadata emulator and waits until IMDS (v2) shows it, then times from calling
``AwsBalancer.deregister`` (what the drain step does on that visible notice) until DescribeTargetHealth
no longer lists the instance healthy in any group. Two client strategies:

* warm: boto3 clients built once at start-up (what ``build_balancers`` does), reused by every drain;
* cold: clients built inside the drain, just before the call.

Prints p50/p99/max per strategy and the cold/warm ratio of medians. Takes well under 2 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import boto3
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import start_moto, summary  # noqa: E402
from spotguard import logs  # noqa: E402
from spotguard.clouds.identity import Identity  # noqa: E402
from spotguard.config import AwsConfig  # noqa: E402
from spotguard.emulator import EmulatorApp, EmulatorControl, run_emulator  # noqa: E402
from spotguard.lb.aws import AwsBalancer, make_clients  # noqa: E402

REGION = "us-east-1"
TARGET_P99 = 1.5


def setup(url: str, groups: int) -> tuple[Any, str, list[str]]:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name=REGION)
    elbv2 = boto3.client("elbv2", endpoint_url=url, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet)
    instance_id = instance["Instances"][0]["InstanceId"]
    arns = []
    for n in range(groups):
        group = elbv2.create_target_group(Name=f"bench-{n}", Protocol="HTTP", Port=8080, VpcId=vpc,
                                          TargetType="instance")
        arns.append(group["TargetGroups"][0]["TargetGroupArn"])
    return elbv2, instance_id, arns


def healthy_anywhere(elbv2: Any, arns: list[str], instance_id: str) -> bool:
    for arn in arns:
        for d in elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]:
            if d["Target"]["Id"] == instance_id and d["TargetHealth"]["State"] not in ("draining", "unused"):
                return True
    return False


async def notice_visible(emu: EmulatorControl, imds: httpx.AsyncClient) -> str:
    """Raise a spot notice and wait until IMDSv2 shows it (not timed: that is bench/detect.py's part)."""
    event_id = await emu.raise_notice("aws", "spot", action="terminate", in_seconds=120)
    token = (await imds.put("/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).text
    with anyio.fail_after(10):
        while (await imds.get("/latest/meta-data/spot/instance-action",
                              headers={"X-aws-ec2-metadata-token": token})).status_code != 200:
            await anyio.sleep(0.005)
    return event_id


async def trial(elbv2: Any, arns: list[str], instance_id: str, config: AwsConfig, identity: Identity,
                warm: AwsBalancer | None, emu: EmulatorControl, imds: httpx.AsyncClient) -> float:
    for arn in arns:
        elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": instance_id, "Port": 8080}])
    assert healthy_anywhere(elbv2, arns, instance_id)
    event_id = await notice_visible(emu, imds)
    started = time.perf_counter()
    balancer = warm if warm is not None else AwsBalancer(config, identity,
                                                         clients=make_clients(REGION, config.endpoint_url))
    with anyio.fail_after(15):
        await balancer.deregister(budget=10, dry_run=False)
        while await anyio.to_thread.run_sync(healthy_anywhere, elbv2, arns, instance_id):
            await anyio.sleep(0.005)  # poll the condition the load balancer would act on
    elapsed = time.perf_counter() - started
    await emu.withdraw("aws", event_id)
    return elapsed


def report(name: str, samples: list[float]) -> dict[str, float]:
    row = summary(samples)
    print(f"{name:6} n={row['n']:3.0f}  p50={row['p50'] * 1000:7.1f} ms  p99={row['p99'] * 1000:7.1f} ms  "
          f"max={row['max'] * 1000:7.1f} ms  min={row['min'] * 1000:7.1f} ms")
    return row


async def main(trials: int, cold_trials: int, groups: int) -> int:
    logs.configure("console", "warning")  # the emulator logs every notice at info
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION}.items():
        os.environ.setdefault(key, value)
    proc, url = start_moto()
    try:
        elbv2, instance_id, arns = setup(url, groups)
        config = AwsConfig(region=REGION, endpoint_url=url, target_group_arns=tuple(arns), target_port=8080)
        identity = Identity(cloud="aws", instance_id=instance_id)
        built = time.perf_counter()
        warm = AwsBalancer(config, identity)  # at daemon start-up
        startup = time.perf_counter() - built
        async with anyio.create_task_group() as tg:
            bound = await tg.start(run_emulator, "127.0.0.1", 0, EmulatorApp())
            async with EmulatorControl(bound.url) as emu, httpx.AsyncClient(base_url=bound.url) as imds:
                args = (elbv2, arns, instance_id, config, identity)
                await trial(*args, warm, emu, imds)  # the first call resolves credentials; not counted
                warm_samples = [await trial(*args, warm, emu, imds) for _ in range(trials)]
                cold_samples = [await trial(*args, None, emu, imds) for _ in range(cold_trials)]
            tg.cancel_scope.cancel()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"moto {url}, {groups} target group(s); client construction at start-up took {startup * 1000:.1f} ms")
    w = report("warm", warm_samples)
    c = report("cold", cold_samples)
    print(f"cold/warm ratio of medians: {c['p50'] / w['p50']:.2f}x; of p99: {c['p99'] / w['p99']:.2f}x")
    ok = w["p99"] <= TARGET_P99
    print(f"target p99 <= {TARGET_P99}s (warm): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--cold-trials", type=int, default=20)
    parser.add_argument("--groups", type=int, default=2)
    args = parser.parse_args()
    raise SystemExit(anyio.run(main, args.trials, args.cold_trials, args.groups))
