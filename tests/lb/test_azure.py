"""Azure: managed-identity token and VM id from the metadata emulator, NIC updates on a loopback ARM."""

from __future__ import annotations

import re
from typing import Any

import anyio
import httpx
import pytest

from spotguard.clouds.identity import Identity
from spotguard.config import AzureConfig
from spotguard.errors import LoadBalancerError
from spotguard.lb.azure import AzureBalancer
from spotguard.metrics import Metrics
from tests.lb.fakes import FakeArm, pools_of, served
from tests.support.emulator import RunningEmulator

TOKEN = re.compile(r"Bearer eyJ0eXAiOiJKV1Qi\.emulated\.[A-Za-z0-9_-]+")
RG = "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourceGroups/spotguard-rg"
VM = f"{RG}/providers/Microsoft.Compute/virtualMachines/spotguard-vm"
NIC = f"{RG}/providers/Microsoft.Network/networkInterfaces/spotguard-vm-nic"
LB = f"{RG}/providers/Microsoft.Network/loadBalancers/llm-lb/backendAddressPools"
OURS, OTHER = f"{LB}/llm-pool", f"{LB}/metrics-pool"
IDENTITY = Identity(cloud="azure", instance_id="02aab8a4-74ef-476e-8182-f6d2ba4166a6", vm_name="spotguard-vm")


def _nic() -> dict[str, Any]:
    return {"id": NIC, "name": "spotguard-vm-nic", "location": "eastus", "etag": 'W/"7"',
            "type": "Microsoft.Network/networkInterfaces",
            "properties": {"provisioningState": "Succeeded", "ipConfigurations": [{
                "id": f"{NIC}/ipConfigurations/ipconfig1", "name": "ipconfig1",
                "properties": {"privateIPAddress": "10.1.0.4", "primary": True,
                               "subnet": {"id": f"{RG}/providers/Microsoft.Network/virtualNetworks/v/subnets/s"},
                               # ARM ids are case-insensitive: the configured id differs in case on purpose.
                               "loadBalancerBackendAddressPools": [{"id": OURS.replace("llm-lb", "LLM-LB")},
                                                                   {"id": OTHER}]}}]}}


def _arm() -> FakeArm:
    return FakeArm(token=TOKEN, vm_id=VM, nics={NIC: _nic()})


async def _run(emulator: RunningEmulator, arm: FakeArm, *, budget: float = 5, dry_run: bool = False,
               metrics: Metrics | None = None) -> str:
    async with served(arm) as url, httpx.AsyncClient() as http:
        arm.base_url = url
        config = AzureConfig(metadata_url=emulator.url, arm_url=url, backend_pools=(OURS,))
        with anyio.fail_after(10):
            return await AzureBalancer(config, http, IDENTITY, metrics=metrics).deregister(budget=budget,
                                                                                       dry_run=dry_run)


def _two_ipconfigs() -> dict[str, Any]:
    """A NIC whose second ip configuration is the load-balanced one (so the primary is the wrong guess)."""
    nic = _nic()
    first = nic["properties"]["ipConfigurations"][0]
    first["properties"]["loadBalancerBackendAddressPools"] = [{"id": OTHER}]
    nic["properties"]["ipConfigurations"].append({
        "id": f"{NIC}/ipConfigurations/llm", "name": "llm",
        "properties": {"privateIPAddress": "10.1.0.5", "primary": False, "subnet": first["properties"]["subnet"],
                       "loadBalancerBackendAddressPools": [{"id": OURS}]}})
    return nic


def _pools_by_ipconfig(nic: dict[str, Any]) -> dict[str, list[str]]:
    return {c["name"]: [p["id"] for p in c["properties"].get("loadBalancerBackendAddressPools", [])]
            for c in nic["properties"]["ipConfigurations"]}


@pytest.mark.anyio
async def test_register_puts_the_pool_back_on_the_ip_configuration_it_left(emulator: RunningEmulator) -> None:
    arm = FakeArm(token=TOKEN, vm_id=VM, nics={NIC: _two_ipconfigs()})
    async with served(arm) as url, httpx.AsyncClient() as http:
        arm.base_url = url
        config = AzureConfig(metadata_url=emulator.url, arm_url=url, backend_pools=(OURS,))
        balancer = AzureBalancer(config, http, IDENTITY)
        with anyio.fail_after(20):
            await balancer.deregister(budget=5, dry_run=False)
            assert _pools_by_ipconfig(arm.nics[NIC]) == {"ipconfig1": [OTHER], "llm": []}
            detail = await balancer.register(budget=5, dry_run=False)
            assert _pools_by_ipconfig(arm.nics[NIC]) == {"ipconfig1": [OTHER], "llm": [OURS]}
            again = await balancer.register(budget=5, dry_run=False)
    assert detail == "added 1 pool reference(s) back to 1 NIC(s)"
    assert again == "1 NIC(s) already in the configured pools"
    assert len(arm.calls("PUT")) == 2  # one to leave, one to rejoin; nothing when already in


@pytest.mark.anyio
async def test_register_after_a_restart_uses_the_primary_ip_configuration(emulator: RunningEmulator) -> None:
    arm = _arm()
    await _run(emulator, arm)  # deregistered by an earlier daemon: this balancer remembers nothing
    async with served(arm) as url, httpx.AsyncClient() as http:
        arm.base_url = url
        config = AzureConfig(metadata_url=emulator.url, arm_url=url, backend_pools=(OURS,))
        with anyio.fail_after(20):
            dry = await AzureBalancer(config, http, IDENTITY).register(budget=5, dry_run=True)
            assert len(arm.calls("PUT")) == 1
            await AzureBalancer(config, http, IDENTITY).register(budget=5, dry_run=False)
    assert "would GET this VM's NICs and PUT them back with 1 backend pool" in dry
    assert _pools_by_ipconfig(arm.nics[NIC]) == {"ipconfig1": [OTHER, OURS]}
    assert arm.calls("PUT")[-1].body["properties"]["ipConfigurations"][0]["properties"]["subnet"]


@pytest.mark.anyio
async def test_removes_only_our_pool_and_waits_for_the_async_operation(emulator: RunningEmulator) -> None:
    arm = _arm()
    arm.polls_in_progress = 2
    detail = await _run(emulator, arm, metrics=Metrics())
    assert pools_of(arm.nics[NIC]) == [OTHER]
    put = arm.calls("PUT")[0]
    assert put.query == {"api-version": "2023-09-01"} and put.content_type == "application/json"
    assert put.body["properties"]["ipConfigurations"][0]["properties"]["subnet"]  # the rest of the NIC is kept
    statuses = [s for s in arm.calls("GET") if "/operations/" in s.path]
    assert len(statuses) == 3  # InProgress, InProgress, Succeeded
    assert "removed 1 pool reference" in detail
    token_calls = await emulator.control.requests("/metadata/identity/oauth2/token")
    assert len(token_calls) == 1


@pytest.mark.anyio
async def test_a_second_run_finds_nothing_to_do(emulator: RunningEmulator) -> None:
    arm = _arm()
    await _run(emulator, arm)
    detail = await _run(emulator, arm)
    assert "already out" in detail
    assert len(arm.calls("PUT")) == 1


@pytest.mark.anyio
async def test_429_with_retry_after_and_5xx_are_retried(emulator: RunningEmulator) -> None:
    arm = _arm()
    arm.fail_next(429, headers={"Retry-After": "1"})
    arm.fail_next(500)
    started = anyio.current_time()
    await _run(emulator, arm)
    assert anyio.current_time() - started >= 1.0  # Retry-After was honoured
    assert pools_of(arm.nics[NIC]) == [OTHER]


@pytest.mark.anyio
async def test_a_concurrent_change_412_is_re_read(emulator: RunningEmulator) -> None:
    arm = _arm()
    original = arm.handle

    def bump_after_get(seen: Any) -> Any:
        answer = original(seen)
        if seen.method == "GET" and seen.path == NIC and not arm.calls("PUT"):
            arm.nics[NIC] = {**arm.nics[NIC], "etag": 'W/"8"'}  # someone else updated the NIC meanwhile
        return answer

    arm.handle = bump_after_get  # type: ignore[method-assign]
    await _run(emulator, arm)
    assert [s.path for s in arm.calls("PUT")] == [NIC, NIC]
    assert pools_of(arm.nics[NIC]) == [OTHER]


@pytest.mark.anyio
async def test_polling_stops_at_the_budget(emulator: RunningEmulator) -> None:
    arm = _arm()
    arm.polls_in_progress = 10_000
    with pytest.raises(LoadBalancerError, match="not confirmed within the budget"):
        await _run(emulator, arm, budget=1.0)
    assert pools_of(arm.nics[NIC]) == [OTHER]  # the change itself went through


@pytest.mark.anyio
async def test_403_names_the_action(emulator: RunningEmulator) -> None:
    arm = _arm()
    arm.denied_put = True
    with pytest.raises(LoadBalancerError, match="Microsoft.Network/networkInterfaces/write"):
        await _run(emulator, arm)


@pytest.mark.anyio
async def test_dry_run_calls_nothing(emulator: RunningEmulator) -> None:
    arm = _arm()
    detail = await _run(emulator, arm, dry_run=True)
    assert "would GET this VM's NICs" in detail
    assert arm.seen == []
    assert await emulator.control.requests("/metadata") == []
