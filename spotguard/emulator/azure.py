"""Azure IMDS: Scheduled Events (with StartRequests approval), instance metadata, managed identity token."""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from spotguard.emulator.instance import EmulatedInstance
from spotguard.emulator.wire import (
    BadRequest,
    Params,
    Reply,
    Request,
    UnknownNotice,
    json_reply,
    rfc1123,
    utcnow,
)

PREFIX = "/metadata/"
EVENTS_PATH = "/metadata/scheduledevents"
INSTANCE_PATH = "/metadata/instance"
TOKEN_PATH = "/metadata/identity/oauth2/token"
EVENT_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
EVENT_STATUSES = ("Scheduled", "Started")
EVENT_SOURCES = ("Platform", "User")
API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
JSON_TYPE = "application/json; charset=utf-8"


def _bad(message: str) -> Reply:
    return json_reply({"error": f"Bad request. {message}"}, 400, content_type=JSON_TYPE)


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    status: str
    event_type: str
    resources: tuple[str, ...]
    not_before: datetime
    description: str
    source: str
    duration: int

    def to_json(self) -> dict[str, Any]:
        return {
            "EventId": self.event_id, "EventStatus": self.status, "EventType": self.event_type,
            "ResourceType": "VirtualMachine", "Resources": list(self.resources),
            # once Started the platform no longer promises a time: NotBefore goes blank
            "NotBefore": "" if self.status == "Started" else rfc1123(self.not_before),
            "Description": self.description, "EventSource": self.source, "DurationInSeconds": self.duration,
        }


class AzureMetadata:
    name = "azure"
    prefix = PREFIX

    def __init__(self, instance: EmulatedInstance) -> None:
        self.instance = instance
        self.incarnation = 1
        self.events: dict[str, ScheduledEvent] = {}
        self.approvals: list[str] = []
        """EventIds approved through StartRequests, in order (repeats kept)."""

    # -- metadata requests ---------------------------------------------------------------------

    async def handle(self, request: Request) -> Reply:
        if "x-forwarded-for" in request.headers:
            return _bad("Request contains the X-Forwarded-For header")
        if request.headers.get("metadata", "").lower() != "true":
            return _bad("Required metadata header not specified")
        version = request.query.get("api-version")
        if version is None:
            return _bad("api-version was not specified")
        if not API_VERSION.match(version):
            return _bad(f"api-version {version!r} is invalid")
        if request.path.rstrip("/") == EVENTS_PATH:
            if request.method == "GET":
                return self._events()
            if request.method == "POST":
                return self._start(request.body)
            return _bad(f"{request.method} is not allowed")
        if request.method != "GET":
            return _bad(f"{request.method} is not allowed")
        if request.path == TOKEN_PATH:
            return self._token(request)
        if request.path.rstrip("/") == INSTANCE_PATH or request.path.startswith(INSTANCE_PATH + "/"):
            return self._instance(request)
        return json_reply({"error": "Not found"}, 404, content_type=JSON_TYPE)

    def _events(self) -> Reply:
        body = {"DocumentIncarnation": self.incarnation, "Events": [e.to_json() for e in self.events.values()]}
        return json_reply(body, content_type=JSON_TYPE)

    def _start(self, body: bytes) -> Reply:
        try:
            requests = json.loads(body)["StartRequests"]
            ids = [str(item["EventId"]) for item in requests]
        except (ValueError, KeyError, TypeError):
            return _bad('body must be {"StartRequests": [{"EventId": "..."}]}')
        changed = False
        for event_id in ids:
            self.approvals.append(event_id)
            event = self.events.get(event_id)
            if event is not None and event.status != "Started":
                self.events[event_id] = replace(event, status="Started")
                changed = True
        if changed:
            self.incarnation += 1
        return Reply(200, b"", JSON_TYPE)

    def _document(self) -> dict[str, Any]:
        i = self.instance
        return {
            "compute": {
                "name": i.vm_name, "vmId": i.vm_id, "subscriptionId": i.subscription_id,
                "resourceGroupName": i.resource_group, "location": i.location, "priority": "Spot",
                "evictionPolicy": "Delete", "vmSize": "Standard_NC4as_T4_v3", "osType": "Linux", "zone": "1",
                "resourceId": (f"/subscriptions/{i.subscription_id}/resourceGroups/{i.resource_group}"
                               f"/providers/Microsoft.Compute/virtualMachines/{i.vm_name}"),
            },
            "network": {"interface": [{
                "ipv4": {"ipAddress": [{"privateIpAddress": i.azure_ip, "publicIpAddress": ""}],
                         "subnet": [{"address": i.azure_ip.rsplit(".", 1)[0] + ".0", "prefix": "24"}]},
                "ipv6": {"ipAddress": []}, "macAddress": "000D3A1B2C3D",
            }]},
        }

    def _instance(self, request: Request) -> Reply:
        node: Any = self._document()
        for part in request.path.removeprefix(INSTANCE_PATH).strip("/").split("/"):
            if not part:
                continue
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return json_reply({"error": "Not found"}, 404, content_type=JSON_TYPE)
        if request.query.get("format") == "text":
            if isinstance(node, (dict, list)):
                return _bad("format text is only supported for leaf nodes")
            return Reply(200, str(node), "text/plain; charset=utf-8")
        return json_reply(node, content_type=JSON_TYPE)

    def _token(self, request: Request) -> Reply:
        resource = request.query.get("resource")
        if not resource:
            return json_reply({"error": "invalid_request",
                               "error_description": "Required query variable 'resource' is missing"},
                              400, content_type=JSON_TYPE)
        now = int(time.time())
        return json_reply({
            "access_token": f"eyJ0eXAiOiJKV1Qi.emulated.{secrets.token_urlsafe(24)}",
            "client_id": self.instance.azure_client_id, "expires_in": "86399",
            "expires_on": str(now + 86399), "ext_expires_in": "86399", "not_before": str(now),
            "resource": resource, "token_type": "Bearer",
        }, content_type=JSON_TYPE)

    # -- control API ---------------------------------------------------------------------------

    def raise_notice(self, kind: str, params: Params) -> str:
        if kind != "event":
            raise BadRequest(f"azure: unknown notice kind {kind!r}; the only kind is event")
        event_id = params.optional_text("event_id") or str(uuid.uuid4()).upper()
        if event_id in self.events:
            raise BadRequest(f"azure event {event_id} already exists")
        event = ScheduledEvent(
            event_id=event_id,
            status=params.choice("status", "Scheduled", EVENT_STATUSES),
            event_type=params.choice("event_type", "Preempt", EVENT_TYPES),
            resources=tuple(params.texts("resources", [self.instance.vm_name])),
            not_before=utcnow() + timedelta(seconds=params.number("not_before_in_seconds", 30.0)),
            description=params.text("description", "Virtual machine is being evicted from Azure Spot VM."),
            source=params.choice("source", "Platform", EVENT_SOURCES),
            duration=params.integer("duration", -1),
        )
        params.done()
        self.events[event_id] = event
        self.incarnation += 1
        return event_id

    def change(self, event_id: str, params: Params) -> None:
        old = self.events.get(event_id)
        if old is None:
            raise UnknownNotice(f"azure: no event with id {event_id}")
        not_before = old.not_before
        if "not_before_in_seconds" in params:
            not_before = utcnow() + timedelta(seconds=params.number("not_before_in_seconds", 0.0))
        event = replace(
            old, status=params.choice("status", old.status, EVENT_STATUSES),
            event_type=params.choice("event_type", old.event_type, EVENT_TYPES),
            resources=tuple(params.texts("resources", list(old.resources))), not_before=not_before,
            description=params.text("description", old.description),
            source=params.choice("source", old.source, EVENT_SOURCES),
            duration=params.integer("duration", old.duration),
        )
        params.done()
        self.events[event_id] = event
        self.incarnation += 1

    def withdraw(self, event_id: str) -> None:
        if self.events.pop(event_id, None) is None:
            raise UnknownNotice(f"azure: no event with id {event_id}")
        self.incarnation += 1

    def expire_tokens(self) -> None:
        """Azure IMDS has no session tokens."""

    def state(self) -> dict[str, Any]:
        return {"DocumentIncarnation": self.incarnation,
                "Events": [e.to_json() for e in self.events.values()], "approvals": list(self.approvals)}

    def close(self) -> None:
        """Nothing waits here."""
