"""Kubernetes: cordon this node, taint it, and exclude it from external load balancers.

One JSON merge patch (``Content-Type: application/merge-patch+json``) on ``/api/v1/nodes/NAME``:
``spec.unschedulable: true``, our taint appended to ``spec.taints``, and the label
``node.kubernetes.io/exclude-from-external-load-balancers``, which makes the service controller drop the
node from cloud load balancers. ``spec.taints`` is a list without a merge key, so any patch replaces
it whole: we read the node, append our taint to what is there, and send ``metadata.resourceVersion``
so a concurrent change answers 409 (then we read again and retry) instead of being clobbered.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from spotguard.lb.kubeconfig import SERVICE_ACCOUNT_DIR, ApiAccess, resolve
from spotguard.lb.retry import Deadline, Fix, count, json_object, send, with_retries

if TYPE_CHECKING:
    from spotguard.config import KubernetesConfig
    from spotguard.metrics import Metrics

PROVIDER = "kubernetes"
TAINT = {"key": "spotguard.io/draining", "value": "true", "effect": "NoSchedule"}
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
MERGE_PATCH = "application/merge-patch+json"


def drain_patch(node: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that cordons, taints and labels ``node`` while keeping its other taints."""
    metadata = node.get("metadata", {})
    taints = [t for t in node.get("spec", {}).get("taints", []) or [] if isinstance(t, dict)]
    if not any(t.get("key") == TAINT["key"] and t.get("effect") == TAINT["effect"] for t in taints):
        taints.append(dict(TAINT))
    patch_metadata: dict[str, Any] = {"labels": {EXCLUDE_LABEL: "true"}}
    if metadata.get("resourceVersion"):
        patch_metadata["resourceVersion"] = metadata["resourceVersion"]
    return {"metadata": patch_metadata, "spec": {"unschedulable": True, "taints": taints}}


class KubernetesNode:
    """This node, as the Kubernetes API server sees it."""

    name = PROVIDER

    def __init__(self, config: KubernetesConfig, http: httpx.AsyncClient, *, metrics: Metrics | None = None,
                 environ: Mapping[str, str] | None = None,
                 service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> None:
        self._http = http
        self._metrics = metrics
        self._node = config.node_name or socket.gethostname()
        self._access: ApiAccess = resolve(config.api_url, config.kubeconfig, environ, service_account_dir)
        # Built once at start-up so a bad CA is a start-up error, not a drain-time one.
        self._ssl = self._access.ssl_context()

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._ssl is None:
            yield self._http
            return
        async with httpx.AsyncClient(verify=self._ssl) as client:
            yield client

    def _headers(self) -> dict[str, str]:
        token = self._access.bearer()
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        url = f"{self._access.server.rstrip('/')}/api/v1/nodes/{self._node}"
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return (f"dry run: would PATCH {url} (unschedulable, taint {TAINT['key']}=true:NoSchedule, "
                    f"label {EXCLUDE_LABEL}=true)")
        deadline = Deadline.after(budget)
        fix = Fix(permission="get and patch on nodes (a ClusterRole bound to spotguard's service account)",
                  resource=f"node {self._node}", setting="[kubernetes] node_name")

        async with self._client() as client:
            async def read_and_patch() -> None:
                headers = self._headers()
                node = json_object(await send(client, "GET", url, what=f"GET node {self._node}", fix=fix,
                                              timeout=deadline.left(), headers=headers), "GET node")
                await send(client, "PATCH", url, what=f"PATCH node {self._node}", fix=fix, timeout=deadline.left(),
                           headers=headers, body=drain_patch(node), content_type=MERGE_PATCH)

            await with_retries(read_and_patch, what=f"cordon node {self._node}", budget=deadline.left(),
                               provider=PROVIDER, metrics=self._metrics)
        return f"cordoned, tainted and excluded node {self._node} from external load balancers"

    async def heartbeat(self, *, dry_run: bool) -> None:
        """Nothing to keep open: the node object stays cordoned."""

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        return "node stays cordoned until it is deleted"
