"""Kubernetes: cordon this node, taint it, and exclude it from external load balancers.

One JSON merge patch (``Content-Type: application/merge-patch+json``) on ``/api/v1/nodes/NAME``:
``spec.unschedulable: true``, our taint appended to ``spec.taints``, and the label
``node.kubernetes.io/exclude-from-external-load-balancers``, which makes the service controller drop the
node from cloud load balancers. ``spec.taints`` is a list without a merge key, so any patch replaces
it whole: we read the node, append our taint to what is there, and send ``metadata.resourceVersion``
so a concurrent change answers 409 (then we read again and retry) instead of being clobbered.

What the drain changed is written on the node itself, in the annotation ``spotguard.io/drained``
(``cordon`` and/or ``exclude-label``: what was not already so), so undrain (``register``) uncordons and
unlabels only what spotguard did, even after a daemon restart; a node an operator cordoned stays cordoned.
Our taint is always ours and always removed.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from spotguard.lb.kubeconfig import SERVICE_ACCOUNT_DIR, ApiAccess, resolve
from spotguard.lb.retry import CallDeadline, Fix, count, json_object, send, with_retries

if TYPE_CHECKING:
    from spotguard.config import KubernetesConfig
    from spotguard.metrics import Metrics

PROVIDER = "kubernetes"
TAINT = {"key": "spotguard.io/draining", "value": "true", "effect": "NoSchedule"}
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
DRAINED_ANNOTATION = "spotguard.io/drained"
"""Comma-separated: what spotguard changed on the node (``cordon``, ``exclude-label``)."""
MERGE_PATCH = "application/merge-patch+json"


def _ours(taint: Any) -> bool:
    return isinstance(taint, dict) and taint.get("key") == TAINT["key"] and taint.get("effect") == TAINT["effect"]


def _metadata_patch(node: dict[str, Any]) -> dict[str, Any]:
    version = node.get("metadata", {}).get("resourceVersion")
    return {"resourceVersion": version} if version else {}


def drain_patch(node: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that cordons, taints and labels ``node`` while keeping its other taints, and notes
    in an annotation which of the cordon and the label it added (a second drain keeps the first note)."""
    metadata = node.get("metadata", {})
    taints = [t for t in node.get("spec", {}).get("taints", []) or [] if isinstance(t, dict)]
    if not any(_ours(t) for t in taints):
        taints.append(dict(TAINT))
    done = drained(node)
    if not node.get("spec", {}).get("unschedulable"):
        done.add("cordon")
    if (metadata.get("labels") or {}).get(EXCLUDE_LABEL) != "true":
        done.add("exclude-label")
    patch_metadata: dict[str, Any] = {"labels": {EXCLUDE_LABEL: "true"}, **_metadata_patch(node)}
    if done:
        patch_metadata["annotations"] = {DRAINED_ANNOTATION: ",".join(sorted(done))}
    return {"metadata": patch_metadata, "spec": {"unschedulable": True, "taints": taints}}


def drained(node: dict[str, Any]) -> set[str]:
    """What an earlier drain by spotguard changed on ``node``, from its annotation."""
    text = (node.get("metadata", {}).get("annotations") or {}).get(DRAINED_ANNOTATION, "")
    return {part.strip() for part in str(text).split(",") if part.strip()}


def undrain_patch(node: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that undoes what ``drain_patch`` changed, None when there is nothing to undo."""
    done = drained(node)
    taints = [t for t in node.get("spec", {}).get("taints", []) or [] if isinstance(t, dict)]
    kept = [t for t in taints if not _ours(t)]
    if not done and len(kept) == len(taints):
        return None
    # null removes a key in a merge patch (RFC 7386); spec.taints has no merge key, so it is sent whole.
    spec: dict[str, Any] = {"taints": kept or None}
    if "cordon" in done:
        spec["unschedulable"] = None
    patch_metadata: dict[str, Any] = {"annotations": {DRAINED_ANNOTATION: None}, **_metadata_patch(node)}
    if "exclude-label" in done:
        patch_metadata["labels"] = {EXCLUDE_LABEL: None}
    return {"metadata": patch_metadata, "spec": spec}


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

    def _fix(self) -> Fix:
        return Fix(permission="get and patch on nodes (a ClusterRole bound to spotguard's service account)",
                   resource=f"node {self._node}", setting="[kubernetes] node_name")

    def _url(self) -> str:
        return f"{self._access.server.rstrip('/')}/api/v1/nodes/{self._node}"

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        url = self._url()
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return (f"dry run: would PATCH {url} (unschedulable, taint {TAINT['key']}=true:NoSchedule, "
                    f"label {EXCLUDE_LABEL}=true)")
        await self._patch(drain_patch, f"cordon node {self._node}", budget)
        return f"cordoned, tainted and excluded node {self._node} from external load balancers"

    async def register(self, *, budget: float, dry_run: bool) -> str:
        """Uncordon and unlabel only what the annotation says spotguard did; always drop our taint."""
        url = self._url()
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return (f"dry run: would PATCH {url} to undo what {DRAINED_ANNOTATION} records and remove taint "
                    f"{TAINT['key']}")
        undone = await self._patch(undrain_patch, f"uncordon node {self._node}", budget)
        if undone is None:
            return f"node {self._node} has nothing spotguard changed (no {DRAINED_ANNOTATION}, no taint): left as is"
        kept = [] if "cordon" in undone else ["cordon (not spotguard's)"]
        kept += [] if "exclude-label" in undone else [f"label {EXCLUDE_LABEL} (not spotguard's)"]
        tail = f"; kept {' and '.join(kept)}" if kept else ""
        return f"node {self._node}: removed taint {TAINT['key']}" + \
            ("; uncordoned" if "cordon" in undone else "") + \
            ("; removed the exclude label" if "exclude-label" in undone else "") + tail

    async def _patch(self, build: Callable[[dict[str, Any]], dict[str, Any] | None], what: str,
                     budget: float) -> set[str] | None:
        """GET the node, PATCH it with ``build(node)`` under its resourceVersion (a 409 re-reads and retries).

        Returns what the node's annotation said was spotguard's before the patch; None when ``build`` had
        nothing to send.
        """
        url = self._url()
        deadline = CallDeadline.after(budget)
        fix = self._fix()

        async with self._client() as client:
            async def read_and_patch() -> set[str] | None:
                headers = self._headers()
                node = json_object(await send(client, "GET", url, what=f"GET node {self._node}", fix=fix,
                                              timeout=deadline.left(), headers=headers), "GET node")
                patch = build(node)
                if patch is None:
                    return None
                await send(client, "PATCH", url, what=f"PATCH node {self._node}", fix=fix, timeout=deadline.left(),
                           headers=headers, body=patch, content_type=MERGE_PATCH)
                return drained(node)

            return await with_retries(read_and_patch, what=what, budget=deadline.left(), provider=PROVIDER,
                                      metrics=self._metrics)

    async def heartbeat(self, *, dry_run: bool) -> None:
        """Nothing to keep open: the node object stays cordoned."""

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        return "node stays cordoned until it is deleted"
