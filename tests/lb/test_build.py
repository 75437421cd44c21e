"""build_balancers: which providers a configuration turns on, and start-up errors."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import httpx
import pytest

from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.errors import ConfigError
from spotguard.lb.base import Checkable, LoadBalancer
from spotguard.lb.build import build_balancers

PROTOCOL_METHODS = ("deregister", "register", "heartbeat", "complete")
IDENTITY = Identity(cloud="aws", instance_id="i-0123456789abcdef0", region="us-east-1", zone="us-central1-a",
                    vm_name="vm")


@pytest.mark.anyio
async def test_nothing_configured_builds_nothing() -> None:
    async with httpx.AsyncClient() as http:
        assert build_balancers(Config(), http, IDENTITY) == ()


@pytest.mark.anyio
async def test_each_configured_section_builds_its_provider(moto_url: str, tmp_path: Path) -> None:
    config = (Config()
              .replace("aws", target_group_arns=["arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/a/1"],
                       endpoint_url=moto_url)
              .replace("gcp", instance_groups=["zones/us-central1-a/instanceGroups/g"])
              .replace("azure", backend_pools=["/subscriptions/s/resourceGroups/r/providers/Microsoft.Network/"
                                               "loadBalancers/l/backendAddressPools/p"])
              .replace("kubernetes", enabled=True, api_url="http://127.0.0.1:1", node_name="n"))
    async with httpx.AsyncClient() as http:
        balancers = build_balancers(config, http, IDENTITY)
    assert [b.name for b in balancers] == ["aws", "gcp", "azure", "kubernetes"]
    assert [isinstance(b, Checkable) for b in balancers] == [True, False, False, False]
    # Each implements the whole protocol, with the same keyword-only parameters, as a coroutine.
    wanted = {name: inspect.signature(getattr(LoadBalancer, name)) for name in PROTOCOL_METHODS}
    for balancer in balancers:
        for name, signature in wanted.items():
            method = getattr(balancer, name, None)
            assert method is not None and inspect.iscoroutinefunction(method), (balancer.name, name)
            got = inspect.signature(method)
            assert [(p.name, p.kind) for p in got.parameters.values()] == \
                [(p.name, p.kind) for p in signature.parameters.values() if p.name != "self"], (balancer.name, name)


@pytest.mark.anyio
async def test_aws_without_a_region_fails_at_start_up() -> None:
    config = Config().replace("aws", lifecycle_hook="hook")
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match=r"\[aws\] region"):
            build_balancers(config, http, Identity(cloud="aws", instance_id="i-1"))


@pytest.mark.anyio
async def test_aws_without_boto3_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an install without spotguard[aws] looks like
    config = Config().replace("aws", lifecycle_hook="hook", region="us-east-1")
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match=r"pip install 'spotguard\[aws\]'"):
            build_balancers(config, http, IDENTITY)
