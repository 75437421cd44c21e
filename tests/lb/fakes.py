"""Loopback stand-ins for the Compute, ARM and Kubernetes APIs, served by uvicorn.

Each checks method, path, query, Content-Type, body and bearer token the way the public reference
documents them, answers with the API's own success and error shapes, and can be told to fail the
next requests (``fail_next``) with 5xx/429 (and Retry-After) to exercise the retry policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from spotguard.asgi import Receive, Scope, Send, header, query_params, read_body, respond, serve_tcp

Answer = tuple[int, Any, dict[str, str]]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    authorization: str
    body: Any


@dataclass
class FakeApi:
    """Base: token check, request log, scripted failures; subclasses route in ``handle``."""

    token: re.Pattern[str]
    seen: list[Seen] = field(default_factory=list)
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    def fail_next(self, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        self.failures.extend([(status, headers or {})] * times)

    def error(self, status: int, message: str, reason: str) -> Any:
        return {"error": {"code": status, "message": message, "status": reason}}

    def handle(self, seen: Seen) -> Answer:
        raise NotImplementedError

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("latin-1")
        seen = Seen(scope["method"], scope["path"], query_params(scope), header(scope, "content-type") or "",
                    header(scope, "authorization") or "", body)
        self.seen.append(seen)
        status: int
        headers: dict[str, str]
        if not self.token.fullmatch(seen.authorization):
            status, payload, headers = 401, self.error(401, "Request is missing a valid bearer token",
                                                       "UNAUTHENTICATED"), {}
        elif self.failures:
            status, headers = self.failures.pop(0)
            payload = self.error(status, "Backend Error" if status >= 500 else "Rate Limit Exceeded",
                                 "UNAVAILABLE" if status >= 500 else "RESOURCE_EXHAUSTED")
        else:
            status, payload, headers = self.handle(seen)
        await respond(send, status, json.dumps(payload), content_type="application/json",
                      headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()])


@asynccontextmanager
async def served(app: Callable[[Scope, Receive, Send], Any]) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 for the duration of the block; yields its base URL.

    An error raised in the block comes out as itself, not wrapped in the task group's ExceptionGroup.
    """
    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            bound = await tg.start(serve_tcp, app, "127.0.0.1", 0)
        try:
            yield bound.url
        except Exception as exc:
            failed.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if failed:
        raise failed[0]


# -- Compute Engine -------------------------------------------------------------------------------


@dataclass
class FakeCompute(FakeApi):
    """instanceGroups.removeInstances/addInstances and networkEndpointGroups.detach/attachNetworkEndpoints
    (Compute v1). Adding a member that is already there answers 400 ``memberAlreadyExists`` as GCE does."""

    project: str = "spotguard-test"
    zone: str = "us-central1-a"
    groups: dict[str, set[str]] = field(default_factory=dict)
    """Instance group name -> instance URLs (partial, projects/...)."""
    negs: dict[str, set[tuple[str, str, int]]] = field(default_factory=dict)
    """NEG name -> (instance, ip, port)."""
    forbidden: set[str] = field(default_factory=set)

    def _operation(self, kind: str, target: str) -> Any:
        base = f"https://compute.googleapis.com/compute/v1/projects/{self.project}/zones/{self.zone}"
        return {"kind": "compute#operation", "id": "7290923409", "name": "operation-1700000000000-abc",
                "operationType": kind, "status": "RUNNING", "progress": 0, "zone": base,
                "targetLink": f"{base}/{target}", "selfLink": f"{base}/operations/operation-1700000000000-abc"}

    def _already(self, message: str) -> Any:
        return {"error": {"code": 400, "message": message,
                          "errors": [{"message": message, "domain": "global", "reason": "memberAlreadyExists"}]}}

    def handle(self, seen: Seen) -> Answer:
        match = re.fullmatch(r"/compute/v1/projects/([^/]+)/zones/([^/]+)/(instanceGroups|networkEndpointGroups)/"
                             r"([^/]+)/(removeInstances|addInstances|detachNetworkEndpoints|attachNetworkEndpoints)", seen.path)
        if seen.method != "POST" or match is None:
            return 404, self.error(404, f"The requested URL {seen.path} was not found.", "NOT_FOUND"), {}
        project, zone, kind, name, verb = match.groups()
        resource = f"projects/{project}/zones/{zone}/{kind}/{name}"
        if name in self.forbidden:
            permission = "compute.instanceGroups.update" if kind == "instanceGroups" else \
                f"compute.networkEndpointGroups.{verb}"
            return 403, self.error(403, f"Required '{permission}' permission for '{resource}'", "PERMISSION_DENIED"), {}
        if seen.content_type != "application/json" or not isinstance(seen.body, dict) or seen.query:
            return 400, self.error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT"), {}
        pool: Any = self.groups if kind == "instanceGroups" else self.negs
        if (project, zone) != (self.project, self.zone) or name not in pool:
            return 404, self.error(404, f"The resource '{resource}' was not found", "NOT_FOUND"), {}
        if verb in ("removeInstances", "addInstances") and kind == "instanceGroups":
            items = seen.body.get("instances")
            if set(seen.body) != {"instances"} or not isinstance(items, list) or \
                    any(set(i) != {"instance"} for i in items):
                return 400, self.error(400, "Invalid value for field 'resource.instances'", "INVALID_ARGUMENT"), {}
            members = {item["instance"] for item in items}
            if verb == "addInstances":
                if members & self.groups[name]:
                    return 400, self._already(f"Resource '{sorted(members)[0]}' is already a member of "
                                              f"'{resource}'."), {}
                self.groups[name] |= members
            else:
                self.groups[name] -= members
        elif verb in ("detachNetworkEndpoints", "attachNetworkEndpoints") and kind == "networkEndpointGroups":
            items = seen.body.get("networkEndpoints")
            if set(seen.body) != {"networkEndpoints"} or not isinstance(items, list) or \
                    any(not set(i) <= {"instance", "ipAddress", "port"} for i in items):
                return 400, self.error(400, "Invalid value for field 'resource.networkEndpoints'",
                                       "INVALID_ARGUMENT"), {}
            endpoints = {(item["instance"], item.get("ipAddress", ""), item.get("port", 0)) for item in items}
            if verb == "attachNetworkEndpoints":
                if endpoints & self.negs[name]:
                    return 400, self._already(f"Network endpoint already exists in '{resource}'."), {}
                self.negs[name] |= endpoints
            else:
                self.negs[name] -= endpoints
        else:
            return 404, self.error(404, f"The requested URL {seen.path} was not found.", "NOT_FOUND"), {}
        return 200, self._operation(verb, f"{kind}/{name}"), {}


# -- Azure Resource Manager -----------------------------------------------------------------------


@dataclass
class FakeArm(FakeApi):
    """GET virtualMachines, GET/PUT networkInterfaces with etags, and Azure-AsyncOperation status."""

    vm_id: str = ""
    nics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """NIC id -> NIC resource body."""
    base_url: str = ""
    polls_in_progress: int = 1
    denied_put: bool = False
    operations: dict[str, int] = field(default_factory=dict)

    def error(self, status: int, message: str, reason: str) -> Any:
        code = {401: "InvalidAuthenticationToken", 403: "AuthorizationFailed", 404: "ResourceNotFound",
                412: "PreconditionFailed", 429: "TooManyRequests"}.get(status, reason)
        return {"error": {"code": code, "message": message}}

    def handle(self, seen: Seen) -> Answer:
        if seen.path.startswith("/subscriptions/") and "/operations/" in seen.path and seen.method == "GET":
            left = self.operations.get(seen.path, 0)
            if left > 0:
                self.operations[seen.path] = left - 1
                return 200, {"status": "InProgress"}, {"Retry-After": "0"}
            return 200, {"status": "Succeeded"}, {}
        if seen.query.get("api-version") != "2023-09-01":
            return 400, {"error": {"code": "InvalidApiVersionParameter",
                                   "message": f"api-version {seen.query.get('api-version')!r} is invalid"}}, {}
        if seen.method == "GET" and seen.path == self.vm_id:
            return 200, {"id": self.vm_id, "name": self.vm_id.rsplit("/", 1)[-1], "location": "eastus",
                         "properties": {"networkProfile": {"networkInterfaces": [
                             {"id": nic, "properties": {"primary": i == 0}} for i, nic in enumerate(self.nics)]}}}, {}
        nic = self.nics.get(seen.path)
        if nic is None:
            return 404, self.error(404, f"The Resource '{seen.path}' was not found.", "ResourceNotFound"), {}
        if seen.method == "GET":
            return 200, nic, {}
        if seen.method != "PUT":
            return 405, self.error(405, "method not allowed", "MethodNotAllowed"), {}
        if self.denied_put:
            return 403, self.error(403, "The client does not have authorization to perform action "
                                        "'Microsoft.Network/networkInterfaces/write'", "AuthorizationFailed"), {}
        if seen.content_type != "application/json" or not isinstance(seen.body, dict):
            return 400, self.error(400, "Invalid request body", "InvalidRequestFormat"), {}
        # (If-Match is checked by the ASGI wrapper below, where headers are at hand.)
        if seen.body.get("location") != nic["location"] or \
                [c["name"] for c in seen.body["properties"]["ipConfigurations"]] != \
                [c["name"] for c in nic["properties"]["ipConfigurations"]]:
            return 400, self.error(400, "ipConfigurations or location changed", "InvalidRequestFormat"), {}
        generation = int(nic["etag"].strip('W/"')) + 1
        updated = {**seen.body, "etag": f'W/"{generation}"'}
        updated["properties"] = {**updated["properties"], "provisioningState": "Succeeded"}
        self.nics[seen.path] = updated
        operation = f"/subscriptions/sub/providers/Microsoft.Network/locations/eastus/operations/op-{generation}"
        self.operations[operation] = self.polls_in_progress
        answer = {**updated, "properties": {**updated["properties"], "provisioningState": "Updating"}}
        return 200, answer, {"Azure-AsyncOperation": f"{self.base_url}{operation}?api-version=2023-09-01"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "PUT":
            nic = self.nics.get(scope["path"])
            if nic is not None and header(scope, "if-match") != nic["etag"]:
                await read_body(receive)
                self.seen.append(Seen("PUT", scope["path"], query_params(scope), "", "", None))
                await respond(send, 412, json.dumps(self.error(412, "etag mismatch", "PreconditionFailed")),
                              content_type="application/json")
                return
        await super().__call__(scope, receive, send)


def pools_of(nic: dict[str, Any]) -> list[str]:
    return [p["id"] for c in nic["properties"]["ipConfigurations"]
            for p in c["properties"].get("loadBalancerBackendAddressPools", [])]


# -- Kubernetes -----------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class FakeKubernetes(FakeApi):
    """GET and PATCH (merge-patch+json) on /api/v1/nodes/NAME, with resourceVersion preconditions."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    race_once: bool = False
    """Change the node between our GET and PATCH once, like a kubelet status update would."""

    def error(self, status: int, message: str, reason: str) -> Any:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": status}

    def handle(self, seen: Seen) -> Answer:
        match = re.fullmatch(r"/api/v1/nodes/([^/]+)", seen.path)
        if match is None:
            return 404, self.error(404, "the server could not find the requested resource", "NotFound"), {}
        name = match[1]
        if name in self.forbidden:
            return 403, self.error(403, f'nodes "{name}" is forbidden: User "system:serviceaccount:spotguard:'
                                        f'spotguard" cannot {seen.method.lower()} resource "nodes"', "Forbidden"), {}
        node = self.nodes.get(name)
        if node is None:
            return 404, self.error(404, f'nodes "{name}" not found', "NotFound"), {}
        if seen.method == "GET":
            answer = json.loads(json.dumps(node))
            if self.race_once:
                self.race_once = False
                node["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"]) + 1)
                node["spec"].setdefault("taints", []).append({"key": "node.kubernetes.io/unreachable",
                                                              "effect": "NoExecute"})
            return 200, answer, {}
        if seen.method != "PATCH":
            return 405, self.error(405, "method not allowed", "MethodNotAllowed"), {}
        if seen.content_type != "application/merge-patch+json":
            return 415, self.error(415, "the body of the request was in an unknown format - accepted media "
                                        "types include: application/json-patch+json, application/merge-patch+json, "
                                        "application/apply-patch+yaml", "UnsupportedMediaType"), {}
        wanted = (seen.body or {}).get("metadata", {}).get("resourceVersion")
        if wanted is not None and wanted != node["metadata"]["resourceVersion"]:
            return 409, self.error(409, f'Operation cannot be fulfilled on nodes "{name}": the object has been '
                                        f'modified; please apply your changes to the latest version and try again',
                                   "Conflict"), {}
        patched = merge_patch(node, seen.body)
        patched["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"]) + 1)
        self.nodes[name] = patched
        return 200, patched, {}


def node(name: str) -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "resourceVersion": "100", "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}}
