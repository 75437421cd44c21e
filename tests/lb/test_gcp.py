"""GCP: token and project from the metadata emulator, Compute calls against a loopback Compute API."""

from __future__ import annotations

import re

import anyio
import httpx
import pytest

from spotguard.clouds.identity import Identity
from spotguard.config import GcpConfig
from spotguard.errors import ConfigError, LoadBalancerError
from spotguard.lb.gcp import GcpBalancer
from spotguard.metrics import Metrics
from tests.lb.fakes import FakeCompute, served
from tests.support.emulator import RunningEmulator

TOKEN = re.compile(r"Bearer ya29\.emulated-[A-Za-z0-9_-]+")
ME = "projects/spotguard-test/zones/us-central1-a/instances/spotguard-vm"
IDENTITY = Identity(cloud="gcp", instance_id="4520031799277581759", vm_name="spotguard-vm",
                    zone="projects/123456789012/zones/us-central1-a", private_ip="10.128.0.7")


def _compute() -> FakeCompute:
    return FakeCompute(token=TOKEN, groups={"llm-ig": {ME, "projects/spotguard-test/zones/us-central1-a/instances/x"}},
                       negs={"llm-neg": {("spotguard-vm", "10.128.0.7", 8000), ("other", "10.128.0.9", 8000)}})


def _config(emulator: RunningEmulator, url: str, **extra: object) -> GcpConfig:
    values: dict[str, object] = {"metadata_url": emulator.url, "compute_url": f"{url}/compute/v1",
                                 "instance_groups": ("zones/us-central1-a/instanceGroups/llm-ig",),
                                 "network_endpoint_groups": ("zones/us-central1-a/networkEndpointGroups/llm-neg",),
                                 "neg_port": 8000, **extra}
    return GcpConfig(**values)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_leaves_the_instance_group_and_the_neg(emulator: RunningEmulator) -> None:
    compute = _compute()
    metrics = Metrics()
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url), http, IDENTITY, metrics=metrics)
        with anyio.fail_after(10):
            detail = await balancer.deregister(budget=5, dry_run=False)
    assert compute.groups["llm-ig"] == {"projects/spotguard-test/zones/us-central1-a/instances/x"}
    assert compute.negs["llm-neg"] == {("other", "10.128.0.9", 8000)}
    posts = compute.calls("POST")
    assert [s.body for s in posts] == [{"instances": [{"instance": ME}]},
                                       {"networkEndpoints": [{"instance": "spotguard-vm", "ipAddress": "10.128.0.7",
                                                              "port": 8000}]}]
    assert "llm-ig (RUNNING)" in detail
    assert metrics.lb_calls.labels(provider="gcp", result="ok")._value.get() == 2


@pytest.mark.anyio
async def test_register_rejoins_with_the_same_member_and_a_member_twice_is_fine(emulator: RunningEmulator) -> None:
    compute = _compute()
    before = {name: set(members) for name, members in compute.groups.items()}, \
        {name: set(members) for name, members in compute.negs.items()}
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url), http, IDENTITY)
        with anyio.fail_after(20):
            await balancer.deregister(budget=5, dry_run=False)
            detail = await balancer.register(budget=5, dry_run=False)
            assert (compute.groups, compute.negs) == before
            again = await balancer.register(budget=5, dry_run=False)
    assert detail == "rejoined llm-ig (RUNNING), llm-neg (RUNNING)"
    assert again == "rejoined llm-ig (already a member), llm-neg (already a member)"
    posts = [s for s in compute.calls("POST") if s.path.endswith(("addInstances", "attachNetworkEndpoints"))]
    assert [s.path.rsplit("/", 1)[-1] for s in posts] == ["addInstances", "attachNetworkEndpoints"] * 2
    assert [s.body for s in posts[:2]] == [{"instances": [{"instance": ME}]},
                                           {"networkEndpoints": [{"instance": "spotguard-vm",
                                                                  "ipAddress": "10.128.0.7", "port": 8000}]}]
    assert (compute.groups, compute.negs) == before


@pytest.mark.anyio
async def test_register_refused_names_the_permission(emulator: RunningEmulator) -> None:
    compute = _compute()
    compute.forbidden.add("llm-neg")
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url), http, IDENTITY)
        with anyio.fail_after(10):
            detail = await balancer.register(budget=5, dry_run=True)
            assert "addInstances" in detail and "attachNetworkEndpoints" in detail and compute.seen == []
            with pytest.raises(LoadBalancerError,
                               match="grant compute.networkEndpointGroups.attachNetworkEndpoints"):
                await balancer.register(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_5xx_429_and_a_failing_token_endpoint_are_retried(emulator: RunningEmulator) -> None:
    compute = _compute()
    compute.fail_next(503)
    compute.fail_next(429, headers={"Retry-After": "0"})
    await emulator.control.fault("/computeMetadata/v1/instance/service-accounts", status=503, count=1)
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url, network_endpoint_groups=()), http, IDENTITY)
        with anyio.fail_after(10):
            await balancer.deregister(budget=5, dry_run=False)
    assert compute.groups["llm-ig"] == {"projects/spotguard-test/zones/us-central1-a/instances/x"}
    assert len(compute.calls("POST")) == 3


@pytest.mark.anyio
async def test_retries_stop_at_the_budget(emulator: RunningEmulator) -> None:
    compute = _compute()
    compute.fail_next(503, times=1000)
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url, network_endpoint_groups=()), http, IDENTITY)
        # Ends with the API's error at its 1.5 s budget; a retry loop that ignored it would run into
        # fail_after(10) (the hang guard) with a TimeoutError instead.
        with anyio.fail_after(10), pytest.raises(LoadBalancerError, match="503"):
            await balancer.deregister(budget=1.5, dry_run=False)
    assert len(compute.calls("POST")) >= 3


@pytest.mark.anyio
async def test_403_names_the_permission_and_other_groups_still_leave(emulator: RunningEmulator) -> None:
    compute = _compute()
    compute.forbidden.add("llm-ig")
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url), http, IDENTITY)
        with anyio.fail_after(10), pytest.raises(LoadBalancerError, match="grant compute.instanceGroups.update"):
            await balancer.deregister(budget=5, dry_run=False)
    assert compute.negs["llm-neg"] == {("other", "10.128.0.9", 8000)}


@pytest.mark.anyio
async def test_unknown_group_names_the_setting(emulator: RunningEmulator) -> None:
    compute = _compute()
    async with served(compute) as url, httpx.AsyncClient() as http:
        config = _config(emulator, url, instance_groups=("projects/spotguard-test/zones/us-central1-a/"
                                                         "instanceGroups/gone",), network_endpoint_groups=())
        balancer = GcpBalancer(config, http, IDENTITY)
        with anyio.fail_after(10), pytest.raises(LoadBalancerError, match=r"\[gcp\] instance_groups"):
            await balancer.deregister(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_dry_run_calls_nothing(emulator: RunningEmulator) -> None:
    compute = _compute()
    async with served(compute) as url, httpx.AsyncClient() as http:
        balancer = GcpBalancer(_config(emulator, url), http, IDENTITY)
        with anyio.fail_after(10):
            detail = await balancer.deregister(budget=5, dry_run=True)
    assert "removeInstances" in detail and "detachNetworkEndpoints" in detail
    assert compute.seen == []
    assert await emulator.control.requests("/computeMetadata") == []


def test_bad_group_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[gcp\] instance_groups"):
        GcpBalancer(GcpConfig(instance_groups=("llm-ig",)), httpx.AsyncClient(), IDENTITY)
