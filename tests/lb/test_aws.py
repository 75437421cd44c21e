"""AWS: target groups against a real moto server over loopback; lifecycle calls with botocore's Stubber.

moto answers CompleteLifecycleAction and RecordLifecycleActionHeartbeat with 500 (not implemented),
so those two are checked with Stubber against the request shape of the AutoScaling API reference
(LifecycleHookName, AutoScalingGroupName, InstanceId, LifecycleActionResult); botocore validates
every stubbed request against its service model too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import boto3
import pytest
from botocore.stub import Stubber

from spotguard.clouds.identity import Identity
from spotguard.config import AwsConfig
from spotguard.errors import ConfigError, LoadBalancerError
from spotguard.lb.aws import AwsBalancer, AwsClients
from spotguard.metrics import Metrics

REGION = "us-east-1"


@dataclass(frozen=True)
class Account:
    url: str
    instance_id: str
    arns: tuple[str, ...]
    elbv2: Any
    ec2: Any


def _client(service: str, url: str) -> Any:
    return boto3.client(service, endpoint_url=url, region_name=REGION)


@pytest.fixture
def account(moto_reset: str) -> Iterator[Account]:
    """A VPC, one instance, and two target groups the instance is registered in (port 8080)."""
    ec2, elbv2 = _client("ec2", moto_reset), _client("elbv2", moto_reset)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet)
    instance_id = instance["Instances"][0]["InstanceId"]
    arns = []
    for name in ("llm-a", "llm-b"):
        group = elbv2.create_target_group(Name=name, Protocol="HTTP", Port=8080, VpcId=vpc, TargetType="instance")
        arn = group["TargetGroups"][0]["TargetGroupArn"]
        elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": instance_id, "Port": 8080}])
        arns.append(arn)
    yield Account(moto_reset, instance_id, tuple(arns), elbv2, ec2)


def _healthy(account: Account, arn: str) -> list[str]:
    answer = account.elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
    return [d["Target"]["Id"] for d in answer if d["TargetHealth"]["State"] not in ("draining", "unused")]


def _balancer(account: Account, metrics: Metrics | None = None, **overrides: Any) -> AwsBalancer:
    values: dict[str, Any] = {"endpoint_url": account.url, "region": REGION, "target_group_arns": account.arns,
                              "target_port": 8080, **overrides}
    config = AwsConfig(**values)
    return AwsBalancer(config, Identity(cloud="aws", instance_id=account.instance_id), metrics=metrics)


@pytest.mark.anyio
async def test_deregister_removes_the_instance_from_every_target_group(account: Account) -> None:
    assert all(_healthy(account, arn) == [account.instance_id] for arn in account.arns)
    metrics = Metrics()
    balancer = _balancer(account, metrics)
    with anyio.fail_after(20):
        detail = await balancer.deregister(budget=10, dry_run=False)
    assert "2 target group" in detail
    assert all(_healthy(account, arn) == [] for arn in account.arns)
    assert metrics.lb_calls.labels(provider="aws", result="ok")._value.get() == 2


@pytest.mark.anyio
async def test_register_puts_the_same_target_back_after_a_deregister(account: Account) -> None:
    metrics = Metrics()
    balancer = _balancer(account, metrics)
    with anyio.fail_after(30):
        await balancer.deregister(budget=10, dry_run=False)
        assert all(_healthy(account, arn) == [] for arn in account.arns)
        detail = await balancer.register(budget=10, dry_run=False)
        # Registering a member again is not an error (an undrain after a partial drain).
        await balancer.register(budget=10, dry_run=False)
    assert detail == f"registered {account.instance_id}:8080 in 2 target group(s)"
    for arn in account.arns:
        targets = account.elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        assert [(t["Target"]["Id"], t["Target"]["Port"]) for t in targets
                if t["TargetHealth"]["State"] not in ("draining", "unused")] == [(account.instance_id, 8080)]
    assert metrics.lb_calls.labels(provider="aws", result="ok")._value.get() == 6


@pytest.mark.anyio
async def test_register_dry_run_and_refusal(account: Account) -> None:
    balancer = _balancer(account, target_group_arns=account.arns[:1])
    with anyio.fail_after(20):
        await balancer.deregister(budget=10, dry_run=False)
        detail = await balancer.register(budget=5, dry_run=True)
    assert detail == (f"dry run: would call elasticloadbalancing:RegisterTargets for {account.instance_id}:8080 "
                      f"on {account.arns[0]}")
    assert _healthy(account, account.arns[0]) == []
    params = {"TargetGroupArn": account.arns[0], "Targets": [{"Id": account.instance_id, "Port": 8080}]}
    with Stubber(balancer.clients.elbv2) as stub:
        stub.add_client_error("register_targets", "Throttling", "Rate exceeded", 400, expected_params=params)
        stub.add_client_error("register_targets", "AccessDenied", "not authorized", 403, expected_params=params)
        with anyio.fail_after(20), \
                pytest.raises(LoadBalancerError, match="grant elasticloadbalancing:RegisterTargets on"):
            await balancer.register(budget=10, dry_run=False)
        stub.assert_no_pending_responses()


@pytest.mark.anyio
async def test_dry_run_calls_nothing(account: Account) -> None:
    balancer = _balancer(account)
    with anyio.fail_after(10):
        detail = await balancer.deregister(budget=5, dry_run=True)
    assert "would call elasticloadbalancing:DeregisterTargets" in detail
    assert all(_healthy(account, arn) == [account.instance_id] for arn in account.arns)


@pytest.mark.anyio
async def test_check_warns_when_the_deregistration_delay_outlasts_the_notice(account: Account) -> None:
    account.elbv2.modify_target_group_attributes(
        TargetGroupArn=account.arns[1], Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "60"}])
    with anyio.fail_after(20):
        warnings = await _balancer(account).check(budget=10)
    assert len(warnings) == 1
    assert account.arns[0] in warnings[0] and "300s" in warnings[0]


@pytest.mark.anyio
async def test_unknown_target_group_is_a_clear_error(account: Account) -> None:
    missing = account.arns[0].replace("llm-a", "nope").rsplit("/", 1)[0] + "/0123456789abcdef"
    config = AwsConfig(endpoint_url=account.url, region=REGION, target_group_arns=(missing,))
    balancer = AwsBalancer(config, Identity(cloud="aws", instance_id=account.instance_id))
    with anyio.fail_after(20), pytest.raises(LoadBalancerError, match="target_group_arns"):
        await balancer.deregister(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_throttling_is_retried_within_the_budget(account: Account) -> None:
    balancer = _balancer(account, target_group_arns=account.arns[:1])
    params = {"TargetGroupArn": account.arns[0], "Targets": [{"Id": account.instance_id, "Port": 8080}]}
    with Stubber(balancer.clients.elbv2) as stub:
        stub.add_client_error("deregister_targets", "Throttling", "Rate exceeded", 400, expected_params=params)
        stub.add_client_error("deregister_targets", "InternalFailure", "oops", 500, expected_params=params)
        stub.add_response("deregister_targets", {}, expected_params=params)
        with anyio.fail_after(20):
            await balancer.deregister(budget=10, dry_run=False)
        stub.assert_no_pending_responses()


@pytest.mark.anyio
async def test_access_denied_names_the_permission(account: Account) -> None:
    balancer = _balancer(account, target_group_arns=account.arns[:1])
    with Stubber(balancer.clients.elbv2) as stub:
        stub.add_client_error("deregister_targets", "AccessDenied", "not authorized", 403)
        with anyio.fail_after(20), pytest.raises(LoadBalancerError, match="elasticloadbalancing:DeregisterTargets"):
            await balancer.deregister(budget=10, dry_run=False)


def test_missing_region_is_a_config_error(account: Account) -> None:
    with pytest.raises(ConfigError, match=r"\[aws\] region"):
        AwsBalancer(AwsConfig(target_group_arns=account.arns), Identity(cloud="aws", instance_id="i-1"),
                    clients=AwsClients(None, None, None))


LIFECYCLE = {"LifecycleHookName": "drain-hook", "AutoScalingGroupName": "llm-asg"}


@pytest.mark.anyio
async def test_heartbeat_and_complete_send_the_documented_requests(account: Account) -> None:
    account.ec2.create_tags(Resources=[account.instance_id],
                            Tags=[{"Key": "aws:autoscaling:groupName", "Value": "llm-asg"}])
    balancer = _balancer(account, lifecycle_hook="drain-hook")  # the group name comes from the tag, via moto
    expected = {**LIFECYCLE, "InstanceId": account.instance_id}
    with Stubber(balancer.clients.autoscaling) as stub:
        stub.add_client_error("record_lifecycle_action_heartbeat", "ServiceUnavailable", "busy", 503,
                              expected_params=expected)
        stub.add_response("record_lifecycle_action_heartbeat", {}, expected_params=expected)
        stub.add_response("complete_lifecycle_action", {},
                          expected_params={**expected, "LifecycleActionResult": "CONTINUE"})
        with anyio.fail_after(20):
            await balancer.heartbeat(dry_run=False)
            detail = await balancer.complete(budget=5, dry_run=False)
        stub.assert_no_pending_responses()
    assert "CONTINUE" in detail


@pytest.mark.anyio
async def test_complete_without_an_active_action_is_a_clear_error(account: Account) -> None:
    balancer = _balancer(account, lifecycle_hook="drain-hook", autoscaling_group="llm-asg")
    with Stubber(balancer.clients.autoscaling) as stub:
        stub.add_client_error("complete_lifecycle_action", "ValidationError",
                              "No active Lifecycle Action found with instance ID", 400)
        with anyio.fail_after(20), pytest.raises(LoadBalancerError, match="No active Lifecycle Action"):
            await balancer.complete(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_missing_group_tag_names_the_setting(account: Account) -> None:
    balancer = _balancer(account, lifecycle_hook="drain-hook")
    with anyio.fail_after(20), pytest.raises(LoadBalancerError, match=r"\[aws\] autoscaling_group"):
        await balancer.complete(budget=5, dry_run=False)
