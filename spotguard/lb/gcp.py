"""Google Cloud: leave (and rejoin) unmanaged instance groups and zonal NEGs through the Compute REST API.

Calls (Compute Engine API v1 reference):
  POST {compute}/projects/P/zones/Z/instanceGroups/G/removeInstances   (undrain: addInstances)
       {"instances": [{"instance": "projects/P/zones/Z/instances/NAME"}]}        compute.instanceGroups.update
  POST {compute}/projects/P/zones/Z/networkEndpointGroups/N/detachNetworkEndpoints   (undrain: attach...)
       {"networkEndpoints": [{"instance": NAME, "ipAddress": IP, "port": PORT}]}
                     compute.networkEndpointGroups.detachNetworkEndpoints (attachNetworkEndpoints)
All answer with a zonal Operation. We do not wait for it to be DONE: with connection draining the
backend service finishes the removal on its own, and the drain has better use for the time.
Adding a member twice answers 400 with reason ``memberAlreadyExists``: for undrain that is success.
The bearer token is the VM service account's, from the metadata server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from spotguard.clouds import fetch
from spotguard.errors import ConfigError, LoadBalancerError, MetadataError
from spotguard.lb.retry import CallDeadline, Fix, TransientError, count, json_object, send, with_retries

if TYPE_CHECKING:
    from spotguard.clouds.identity import Identity
    from spotguard.config import GcpConfig
    from spotguard.metrics import Metrics

PROVIDER = "gcp"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
PROJECT_PATH = "/computeMetadata/v1/project/project-id"
FLAVOR = {"Metadata-Flavor": "Google"}
ALREADY_THERE = frozenset({"memberAlreadyExists", "alreadyExists"})
"""Google error reasons that mean an add/attach found the VM already in the group."""
_VERBS = {("instanceGroups", False): "removeInstances", ("instanceGroups", True): "addInstances",
          ("networkEndpointGroups", False): "detachNetworkEndpoints",
          ("networkEndpointGroups", True): "attachNetworkEndpoints"}

_GROUP = re.compile(r"^(?:projects/(?P<project>[^/]+)/)?zones/(?P<zone>[^/]+)/"
                    r"(?P<kind>instanceGroups|networkEndpointGroups)/(?P<name>[^/]+)$")


@dataclass(frozen=True, kw_only=True)
class Group:
    """One configured group: an unmanaged instance group or a zonal network endpoint group."""

    kind: str
    zone: str
    name: str
    project: str = ""

    def path(self, project: str) -> str:
        return f"projects/{self.project or project}/zones/{self.zone}/{self.kind}/{self.name}"


def parse_group(text: str, key: str, kind: str) -> Group:
    match = _GROUP.match(text.strip().strip("/"))
    if match is None or match["kind"] != kind:
        raise ConfigError(f"[gcp] {key}: {text!r} is not zones/ZONE/{kind}/NAME "
                          f"(optionally prefixed by projects/PROJECT/)")
    return Group(kind=kind, zone=match["zone"], name=match["name"], project=match["project"] or "")


def _already_there(response: httpx.Response) -> bool:
    """A 400 whose ``error.errors[].reason`` says the member is already in the group."""
    if response.status_code != 400:
        return False
    try:
        error = response.json().get("error", {})
        reasons = {str(e.get("reason", "")) for e in error.get("errors", []) if isinstance(e, dict)}
    except (ValueError, AttributeError):
        return False
    return bool(reasons & ALREADY_THERE)


class GcpBalancer:
    """This VM in unmanaged instance groups and GCE_VM_IP_PORT network endpoint groups."""

    name = PROVIDER

    def __init__(self, config: GcpConfig, http: httpx.AsyncClient, identity: Identity, *,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._http = http
        self._metrics = metrics
        self._groups = tuple(parse_group(g, "instance_groups", "instanceGroups") for g in config.instance_groups) + \
            tuple(parse_group(g, "network_endpoint_groups", "networkEndpointGroups")
                  for g in config.network_endpoint_groups)
        self._vm = identity.vm_name or identity.instance_id
        # The metadata server gives the zone as projects/NUMBER/zones/ZONE; only the last part matters.
        self._zone = identity.zone.rsplit("/", 1)[-1]
        self._ip = identity.private_ip
        if self._groups and not (self._vm and self._zone):
            raise ConfigError("GCP deregistration needs this VM's name and zone from the metadata server; "
                              "none were found (is [agent] cloud right?)")

    async def _metadata(self, path: str, what: str, budget: float) -> str:
        async def call() -> str:
            try:
                answer = await fetch.request(self._http, "GET", self._config.metadata_url + path, headers=FLAVOR,
                                             timeout=min(budget, 5.0))
            except MetadataError as exc:
                raise TransientError(f"{what}: {exc}") from exc
            if answer.status != 200:
                raise LoadBalancerError(f"{what}: metadata server answered HTTP {answer.status}; does the VM "
                                        f"have a service account with the cloud-platform or compute scope?")
            return answer.text
        return await with_retries(call, what=what, budget=budget, provider=PROVIDER, metrics=None)

    async def _token(self, budget: float) -> str:
        text = await self._metadata(TOKEN_PATH, "service-account token", budget)
        try:
            token = json.loads(text).get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise LoadBalancerError("service-account token: the metadata server's answer has no access_token")
        return token

    def _request(self, group: Group, project: str, *, join: bool = False) -> tuple[str, dict[str, object], Fix]:
        """URL, body and what to fix for leaving (or, with ``join``, rejoining) ``group``: the same member."""
        url = f"{self._config.compute_url.rstrip('/')}/{group.path(project)}"
        resource = f"{group.kind} {group.path(project)}"
        verb = _VERBS[group.kind, join]
        if group.kind == "instanceGroups":
            instance = f"projects/{project}/zones/{self._zone}/instances/{self._vm}"
            fix = Fix(permission="compute.instanceGroups.update", resource=resource,
                      setting="[gcp] instance_groups")
            return f"{url}/{verb}", {"instances": [{"instance": instance}]}, fix
        endpoint: dict[str, object] = {"instance": self._vm}
        if self._ip:
            endpoint["ipAddress"] = self._ip
        if self._config.neg_port:
            endpoint["port"] = self._config.neg_port
        fix = Fix(permission=f"compute.networkEndpointGroups.{verb} (and compute.instances.use)",
                  resource=resource, setting="[gcp] network_endpoint_groups")
        return f"{url}/{verb}", {"networkEndpoints": [endpoint]}, fix

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        return await self._change(join=False, budget=budget, dry_run=dry_run)

    async def register(self, *, budget: float, dry_run: bool) -> str:
        """Rejoin every configured group with the member deregister removed (same instance, IP and port)."""
        return await self._change(join=True, budget=budget, dry_run=dry_run)

    async def _change(self, *, join: bool, budget: float, dry_run: bool) -> str:
        if not self._groups:
            return "no instance groups or network endpoint groups configured"
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            calls = [f"POST {self._request(g, g.project or '<project>', join=join)[0]}" for g in self._groups]
            return "dry run: would call " + "; ".join(calls)
        deadline = CallDeadline.after(budget)
        token = await self._token(deadline.left())
        project = ""
        if any(not g.project for g in self._groups):
            project = (await self._metadata(PROJECT_PATH, "project id", deadline.left())).strip()
        headers = {"Authorization": f"Bearer {token}"}
        done: list[str] = []
        errors: list[str] = []
        # One group failing must not keep the VM in the others.
        for group in self._groups:
            url, body, fix = self._request(group, project, join=join)
            what = f"{url.rsplit('/', 1)[-1]} {group.name}"

            async def call(url: str = url, body: dict[str, object] = body, fix: Fix = fix,
                           what: str = what) -> str:
                response = await send(self._http, "POST", url, what=what, fix=fix, timeout=deadline.left(),
                                      headers=headers, body=body, done_already=_already_there if join else None)
                if response.status_code >= 300:
                    return "already a member"
                operation = json_object(response, what)
                if isinstance(operation.get("error"), dict):
                    raise LoadBalancerError(f"{what}: operation failed: {operation['error']}")
                return str(operation.get("status", "PENDING"))
            try:
                status = await with_retries(call, what=what, budget=deadline.left(), provider=PROVIDER,
                                            metrics=self._metrics)
            except LoadBalancerError as exc:
                errors.append(str(exc))
                continue
            done.append(f"{group.name} ({status})")
        if errors:
            raise LoadBalancerError("; ".join(errors))
        return f"{'rejoined' if join else 'left'} {', '.join(done)}"

    async def heartbeat(self, *, dry_run: bool) -> None:
        """GCP has no lifecycle action to keep open."""

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        return "nothing to complete on GCP"
