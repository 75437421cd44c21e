"""Azure: take this VM's NIC ip configurations out of (and back into) load-balancer backend pools, via ARM REST.

Calls (ARM reference, Microsoft.Compute and Microsoft.Network):
  IMDS  GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/
  IMDS  GET /metadata/instance/compute?api-version=2021-02-01            -> resourceId of this VM
  ARM   GET {vm resourceId}?api-version=2023-09-01                      -> networkProfile.networkInterfaces[].id
  ARM   GET {nic id}?api-version=2023-09-01, drop the pools from
        properties.ipConfigurations[].properties.loadBalancerBackendAddressPools,
        PUT it back with If-Match: its etag (a concurrent change answers 412: re-read and retry)
  ARM   GET Azure-AsyncOperation URL until Succeeded, only while the budget lasts.
Undrain (``register``) adds each configured pool that no ip configuration holds any more back to the ip
configuration it was taken from (remembered in memory), or, after a daemon restart, to the primary ip
configuration of the primary NIC, where a VM's load-balanced address normally is.
The role needed is in docs/permissions.md. Scale-set (Uniform) instances are refused: their pools live in
the scale set model. A user-assigned identity is not selectable (IMDS picks the system-assigned one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from spotguard.clouds import fetch
from spotguard.errors import LoadBalancerError, MetadataError
from spotguard.lb.retry import (
    CallDeadline,
    Fix,
    TransientError,
    count,
    json_object,
    retry_after,
    send,
    with_retries,
)

if TYPE_CHECKING:
    from spotguard.clouds.identity import Identity
    from spotguard.config import AzureConfig
    from spotguard.metrics import Metrics

PROVIDER = "azure"
TOKEN_PATH = "/metadata/identity/oauth2/token"
COMPUTE_PATH = "/metadata/instance/compute"
ARM_RESOURCE = "https://management.azure.com/"
NETWORK_API = "2023-09-01"
COMPUTE_API = "2023-09-01"
POLL_INTERVAL = (0.2, 2.0)
"""Bounds on the wait between Azure-AsyncOperation polls, whatever Retry-After says."""


@dataclass(frozen=True)
class _Auth:
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _key(pool: Any) -> str:
    """A backend pool reference's id, in the form ids compare in."""
    return str(pool.get("id", "") if isinstance(pool, dict) else "").rstrip("/").lower()


def _primary(nics: list[dict[str, Any]], bodies: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(NIC id, ip configuration name) of the primary ip configuration of the primary NIC."""
    nic_id = str(nics[0]["id"]).lower()
    configs = bodies[nic_id].get("properties", {}).get("ipConfigurations", []) or []
    if not configs:
        raise LoadBalancerError(f"NIC {nic_id} has no ip configuration to put back into the backend pools")
    primary = next((c for c in configs if c.get("properties", {}).get("primary")), configs[0])
    return nic_id, str(primary.get("name", ""))


class AzureBalancer:
    """This VM's NICs in the configured Azure Load Balancer backend pools."""

    name = PROVIDER

    def __init__(self, config: AzureConfig, http: httpx.AsyncClient, identity: Identity, *,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._http = http
        self._metrics = metrics
        self._arm = config.arm_url.rstrip("/")
        # ARM ids compare case-insensitively; the configured spelling is what we write back.
        self._spelled = {p.strip().rstrip("/").lower(): p.strip().rstrip("/") for p in config.backend_pools
                         if p.strip()}
        self._pools = frozenset(self._spelled)
        self._taken: dict[str, tuple[str, str]] = {}
        """Pool (lower-cased id) -> (NIC id, ip configuration name) it was removed from, for register()."""

    async def _imds(self, path: str, params: dict[str, str], what: str, budget: float) -> dict[str, Any]:
        async def call() -> dict[str, Any]:
            try:
                answer = await fetch.request(self._http, "GET", self._config.metadata_url + path,
                                             headers={"Metadata": "true"}, params=params, timeout=min(budget, 5.0))
            except MetadataError as exc:
                raise TransientError(f"{what}: {exc}") from exc
            if answer.status != 200:
                raise LoadBalancerError(f"{what}: IMDS answered HTTP {answer.status}; does the VM have a "
                                        f"managed identity (and a role on the NIC, see docs/permissions.md)?")
            try:
                data = json.loads(answer.text)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise LoadBalancerError(f"{what}: IMDS's answer is not a JSON object")
            return data
        return await with_retries(call, what=what, budget=budget, provider=PROVIDER, metrics=None)

    async def _token(self, budget: float) -> _Auth:
        data = await self._imds(TOKEN_PATH, {"api-version": "2018-02-01", "resource": ARM_RESOURCE},
                                "managed-identity token", budget)
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise LoadBalancerError("managed-identity token: IMDS's answer has no access_token")
        return _Auth(token)

    async def _vm_id(self, budget: float) -> str:
        data = await self._imds(COMPUTE_PATH, {"api-version": "2021-02-01"}, "instance compute metadata", budget)
        resource_id = data.get("resourceId")
        if not isinstance(resource_id, str) or "/virtualmachines/" not in resource_id.lower():
            raise LoadBalancerError("instance compute metadata has no virtual machine resourceId")
        if "/virtualmachinescalesets/" in resource_id.lower():
            raise LoadBalancerError(f"{resource_id} is a scale-set (Uniform) instance: its pool membership is in "
                                    f"the scale set model, which spotguard does not change; use health probes "
                                    f"(docs/permissions.md) or Flexible orchestration")
        return resource_id

    async def _get(self, resource_id: str, api: str, auth: _Auth, fix: Fix, deadline: CallDeadline) -> httpx.Response:
        what = f"GET {resource_id.rsplit('/', 1)[-1]}"

        async def call() -> httpx.Response:
            return await send(self._http, "GET", self._arm + resource_id, what=what, fix=fix, timeout=deadline.left(),
                              headers=auth.headers, params={"api-version": api})
        return await with_retries(call, what=what, budget=deadline.left(), provider=PROVIDER, metrics=self._metrics)

    def _without_pools(self, nic_id: str, nic: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The NIC body with our pools removed from every ip configuration, and how many were removed."""
        removed = 0
        for ipconfig in nic.get("properties", {}).get("ipConfigurations", []) or []:
            props = ipconfig.get("properties", {})
            pools = props.get("loadBalancerBackendAddressPools") or []
            kept = [p for p in pools if _key(p) not in self._pools]
            for pool in pools:
                if _key(pool) in self._pools:
                    self._taken[_key(pool)] = (nic_id.lower(), str(ipconfig.get("name", "")))
            removed += len(pools) - len(kept)
            if len(kept) != len(pools):
                props["loadBalancerBackendAddressPools"] = kept
        return nic, removed

    def _with_pools(self, nic: dict[str, Any], wanted: dict[str, str]) -> tuple[dict[str, Any], int]:
        """The NIC body with each pool in ``wanted`` (pool -> ip configuration name) added; how many were added."""
        added = 0
        for ipconfig in nic.get("properties", {}).get("ipConfigurations", []) or []:
            props = ipconfig.setdefault("properties", {})
            pools = list(props.get("loadBalancerBackendAddressPools") or [])
            have = {_key(p) for p in pools}
            new = [{"id": self._spelled[pool]} for pool, name in sorted(wanted.items())
                   if name == ipconfig.get("name") and pool not in have]
            if new:
                props["loadBalancerBackendAddressPools"] = pools + new
                added += len(new)
        return nic, added

    async def _update(self, nic_id: str, edit: Callable[[dict[str, Any]], tuple[dict[str, Any], int]],
                      auth: _Auth, deadline: CallDeadline) -> int:
        """GET the NIC, ``edit`` it, PUT it back under its etag (a 412 re-reads), follow the operation."""
        name = nic_id.rsplit("/", 1)[-1]
        fix = Fix(permission="Microsoft.Network/networkInterfaces/read and .../write "
                             "(and Microsoft.Network/loadBalancers/backendAddressPools/join/action to rejoin)",
                  resource=f"NIC {nic_id}", setting="[azure] backend_pools")

        async def read_modify_write() -> tuple[int, str]:
            # The read is inside the retry so a 412 (someone else changed the NIC) re-reads it.
            nic, changed = edit(json_object(await send(
                self._http, "GET", self._arm + nic_id, what=f"GET NIC {name}", fix=fix, timeout=deadline.left(),
                headers=auth.headers, params={"api-version": NETWORK_API}), f"GET NIC {name}"))
            if not changed:
                return 0, ""
            headers = dict(auth.headers)
            if nic.get("etag"):
                headers["If-Match"] = str(nic["etag"])
            response = await send(self._http, "PUT", self._arm + nic_id, what=f"PUT NIC {name}", fix=fix,
                                  timeout=deadline.left(), headers=headers, params={"api-version": NETWORK_API},
                                  body=nic)
            return changed, response.headers.get("azure-asyncoperation", "")

        changed, operation = await with_retries(read_modify_write, what=f"update NIC {name}",
                                                budget=deadline.left(), provider=PROVIDER, metrics=self._metrics)
        if operation:
            await self._poll(operation, auth, fix, deadline)
        return changed

    async def _poll(self, url: str, auth: _Auth, fix: Fix, deadline: CallDeadline) -> None:
        """Follow Azure-AsyncOperation until a terminal status, but never past the budget."""
        while deadline.left() > POLL_INTERVAL[0]:
            try:
                response = await send(self._http, "GET", url, what="NIC update status", fix=fix,
                                      timeout=deadline.left(), headers=auth.headers)
            except TransientError:
                response = None
            if response is not None:
                status = str(json_object(response, "NIC update status").get("status", ""))
                if status == "Succeeded":
                    return
                if status in ("Failed", "Canceled"):
                    error = json_object(response, "NIC update status").get("error")
                    raise LoadBalancerError(f"NIC update {status.lower()}: {error}")
            hint = retry_after(response.headers) if response is not None else None
            wait = min(max(1.0 if hint is None else hint, POLL_INTERVAL[0]), POLL_INTERVAL[1])
            if wait >= deadline.left():
                break
            await anyio.sleep(wait)
        raise LoadBalancerError("NIC update accepted, but not confirmed within the budget (Azure-AsyncOperation "
                                "still InProgress)")

    async def _nics(self, auth: _Auth, deadline: CallDeadline) -> list[dict[str, Any]]:
        """This VM's NIC references (``id``, ``properties.primary``), primary first."""
        vm_id = await self._vm_id(deadline.left())
        vm_fix = Fix(permission="Microsoft.Compute/virtualMachines/read", resource=f"VM {vm_id}",
                     setting="the VM's managed identity")
        vm = json_object(await self._get(vm_id, COMPUTE_API, auth, vm_fix, deadline), "GET VM")
        nics = [n for n in vm.get("properties", {}).get("networkProfile", {}).get("networkInterfaces", []) or []
                if isinstance(n, dict) and n.get("id")]
        if not nics:
            raise LoadBalancerError(f"VM {vm_id} lists no network interfaces")
        return sorted(nics, key=lambda n: not n.get("properties", {}).get("primary", False))

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        if not self._pools:
            return "no backend pools configured"
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return (f"dry run: would GET this VM's NICs and PUT them back without "
                    f"{len(self._pools)} backend pool(s): {', '.join(sorted(self._pools))}")
        deadline = CallDeadline.after(budget)
        auth = await self._token(deadline.left())
        nics = [str(n["id"]) for n in await self._nics(auth, deadline)]
        removed = 0
        for nic_id in nics:
            removed += await self._update(nic_id, partial(self._without_pools, nic_id), auth, deadline)
        if not removed:
            return f"{len(nics)} NIC(s) already out of the configured pools"
        return f"removed {removed} pool reference(s) from {len(nics)} NIC(s)"

    async def register(self, *, budget: float, dry_run: bool) -> str:
        """Put each configured pool that no ip configuration holds back where it was taken from."""
        if not self._pools:
            return "no backend pools configured"
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return (f"dry run: would GET this VM's NICs and PUT them back with "
                    f"{len(self._pools)} backend pool(s): {', '.join(sorted(self._pools))}")
        deadline = CallDeadline.after(budget)
        auth = await self._token(deadline.left())
        nics = await self._nics(auth, deadline)
        fix = Fix(permission="Microsoft.Network/networkInterfaces/read", resource="this VM's NICs",
                  setting="[azure] backend_pools")
        bodies = {str(n["id"]).lower(): json_object(await self._get(str(n["id"]), NETWORK_API, auth, fix, deadline),
                                                    "GET NIC") for n in nics}
        held = {_key(p) for nic in bodies.values() for c in nic.get("properties", {}).get("ipConfigurations", []) or []
                for p in c.get("properties", {}).get("loadBalancerBackendAddressPools") or []}
        missing = sorted(self._pools - held)
        if not missing:
            return f"{len(nics)} NIC(s) already in the configured pools"
        wanted: dict[str, dict[str, str]] = {}  # NIC id -> pool -> ip configuration name
        for pool in missing:
            nic_id, ipconfig = self._taken.get(pool) or _primary(nics, bodies)
            wanted.setdefault(nic_id, {})[pool] = ipconfig
        added = 0
        for nic_id, pools in wanted.items():
            original = next(str(n["id"]) for n in nics if str(n["id"]).lower() == nic_id)
            added += await self._update(original, partial(self._with_pools, wanted=pools), auth, deadline)
        self._taken.clear()
        return f"added {added} pool reference(s) back to {len(wanted)} NIC(s)"

    async def heartbeat(self, *, dry_run: bool) -> None:
        """Azure has no lifecycle action to keep open (the Scheduled Event is approved by the cloud source)."""

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        return "nothing to complete on Azure"
