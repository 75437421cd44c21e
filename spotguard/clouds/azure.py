"""Azure: Scheduled Events from IMDS.

One source polls ``/metadata/scheduledevents``; every event whose ``Resources`` name this VM is a
notice: kind = EventType lowercased (``preempt``, ``terminate``, ``reboot``, ...), event id = EventId,
drain for the types in ``[azure] drain_event_types`` and observe for the rest, deadline = NotBefore
(or detection + ``[azure] default_window`` once Started, when NotBefore is blank). A finished or
cancelled event disappears from the document, which the runner reads as a withdrawal.

``approve`` tells Azure to go ahead early (StartRequests), once the drain is done.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from spotguard.clouds import fetch
from spotguard.clouds._parse import FirstSeen, Seen, field_str, http_time, json_object, shift
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.errors import MalformedMetadata, MetadataUnavailable
from spotguard.notice import Notice

EVENTS_PATH = "/metadata/scheduledevents"
EVENTS_API = "2020-07-01"
NAME_PATH = "/metadata/instance/compute/name"
INSTANCE_PATH = "/metadata/instance"
INSTANCE_API = "2021-02-01"
HEADERS = {"Metadata": "true"}

SOURCE = "azure"
FIRST_CALL_TIMEOUT = 120.0
"""Scheduled Events switches itself on at the first call after boot, which may take up to 2 minutes;
until one call has been answered we wait that long, so start-up is not counted as a failure storm."""

_VM_NAME = re.compile(r"[A-Za-z0-9._\-]{1,128}")


@dataclass(frozen=True)
class EventsDocument:
    incarnation: int
    notices: tuple[Notice, ...]


# ---- pure parser ----------------------------------------------------------------------------------

def parse_events(text: str, seen: Seen, *, vm_name: str, drain_types: Sequence[str],
                 default_window: float) -> EventsDocument:
    """The Scheduled Events document -> the notices for ``vm_name`` (case-insensitive, as Azure names are).

    An event drains when its EventType is in ``drain_types``, compared case-insensitively.
    """
    what = "scheduledevents"
    data = json_object(text, what)
    incarnation = data.get("DocumentIncarnation")
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
        raise MalformedMetadata(f"{what}: DocumentIncarnation must be a non-negative integer", reason="bad_shape")
    events = data.get("Events")
    if not isinstance(events, list):
        raise MalformedMetadata(f"{what}: Events must be a list", reason="bad_shape")
    me = vm_name.casefold()
    draining = {t.strip().lower() for t in drain_types}  # kinds are shown lower-cased; match them so
    notices: list[Notice] = []
    for event in events:
        if not isinstance(event, dict):
            raise MalformedMetadata(f"{what}: each event must be an object", reason="bad_shape")
        event_id = field_str(event, "EventId", what)
        event_type = field_str(event, "EventType", what)
        status = field_str(event, "EventStatus", what, optional=True)
        not_before = field_str(event, "NotBefore", what, optional=True)
        resources = event.get("Resources")
        if not event_id or not event_type:
            raise MalformedMetadata(f"{what}: empty EventId or EventType", reason="bad_value")
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            raise MalformedMetadata(f"{what}: Resources must be a list of strings", reason="bad_shape")
        if me not in (r.casefold() for r in resources):
            continue  # another VM's event (the document covers the whole availability set / scale set)
        detected = seen(event_id)
        if not_before and status != "Started":
            deadline = http_time(not_before, what)
        else:
            deadline = shift(detected, default_window, what)
        notices.append(Notice(source=SOURCE, kind=event_type.lower(), event_id=event_id, deadline=deadline,
                              detected_at=detected, action="drain" if event_type.lower() in draining else "observe",
                              payload=json.dumps(event, sort_keys=True)))
    return EventsDocument(incarnation, tuple(notices))


# ---- I/O ------------------------------------------------------------------------------------------

class AzureSource:
    """Polls Scheduled Events once per tick; tracks DocumentIncarnation (``incarnation``)."""

    name = "azure"
    hanging = False
    interval: float | None = None

    def __init__(self, config: Config, http: httpx.AsyncClient) -> None:
        self._config = config
        self._http = http
        self._url = config.azure.metadata_url.rstrip("/") + EVENTS_PATH
        self._vm_name = config.azure.vm_name
        self._answered = False
        self._seen = FirstSeen()
        self.incarnation: int | None = None
        """The last document's incarnation: it grows whenever the event list changes."""

    async def poll(self) -> Sequence[Notice]:
        vm_name = self._vm_name or await self._fetch_vm_name()
        timeout = self._config.agent.request_timeout if self._answered else max(
            FIRST_CALL_TIMEOUT, self._config.agent.request_timeout)
        response = await fetch.request(self._http, "GET", self._url, headers=HEADERS,
                                       params={"api-version": EVENTS_API}, timeout=timeout)
        self._answered = True
        if response.status != 200:
            raise MetadataUnavailable(f"GET {EVENTS_PATH}: HTTP {response.status}", reason=f"status_{response.status}")
        azure = self._config.azure
        document = parse_events(response.text, self._seen, vm_name=vm_name, drain_types=azure.drain_event_types,
                                default_window=azure.default_window)
        self.incarnation = document.incarnation
        self._seen.keep(n.event_id for n in document.notices)
        return list(document.notices)

    async def _fetch_vm_name(self) -> str:
        """Asked once, then cached: the name of a VM does not change while it runs."""
        self._vm_name = await vm_name(self._config, self._http)
        return self._vm_name

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the daemon."""


async def vm_name(config: Config, http: httpx.AsyncClient) -> str:
    """This VM's name as IMDS reports it (the name used in Resources)."""
    response = await fetch.request(http, "GET", config.azure.metadata_url.rstrip("/") + NAME_PATH, headers=HEADERS,
                                   params={"api-version": INSTANCE_API, "format": "text"},
                                   timeout=config.agent.request_timeout)
    if response.status != 200:
        raise MetadataUnavailable(f"GET {NAME_PATH}: HTTP {response.status}", reason=f"status_{response.status}")
    name = response.text.strip()
    if not _VM_NAME.fullmatch(name):
        raise MalformedMetadata(f"GET {NAME_PATH}: {name[:40]!r} is not a VM name (set [azure] vm_name)",
                                reason="bad_vm_name")
    return name


async def approve(config: Config, http: httpx.AsyncClient, event_id: str, *, timeout: float | None = None) -> str:
    """Let Azure start the event now (StartRequests); returns a detail line for the drain timeline."""
    body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
    response = await fetch.request(http, "POST", config.azure.metadata_url.rstrip("/") + EVENTS_PATH,
                                   headers={**HEADERS, "Content-Type": "application/json"},
                                   params={"api-version": EVENTS_API}, content=body,
                                   timeout=config.agent.request_timeout if timeout is None else timeout)
    if response.status != 200:
        raise MetadataUnavailable(f"POST {EVENTS_PATH} StartRequests {event_id}: HTTP {response.status}",
                                  reason=f"status_{response.status}")
    return f"approved scheduled event {event_id}"


def build_sources(config: Config, http: httpx.AsyncClient) -> list[AzureSource]:
    return [AzureSource(config, http)]


async def identity(config: Config, http: httpx.AsyncClient) -> Identity:
    """vmId, name, location, zone and the first private IP from the instance document."""
    response = await fetch.request(http, "GET", config.azure.metadata_url.rstrip("/") + INSTANCE_PATH,
                                   headers=HEADERS, params={"api-version": INSTANCE_API},
                                   timeout=config.agent.request_timeout)
    if response.status != 200:
        raise MetadataUnavailable(f"GET {INSTANCE_PATH}: HTTP {response.status}", reason=f"status_{response.status}")
    return parse_instance(response.text)


def parse_instance(text: str) -> Identity:
    what = "metadata/instance"
    data = json_object(text, what)
    compute = data.get("compute")
    if not isinstance(compute, dict):
        raise MalformedMetadata(f"{what}: 'compute' must be an object", reason="bad_shape")
    vm_id = field_str(compute, "vmId", what)
    if not vm_id:
        raise MalformedMetadata(f"{what}: empty vmId", reason="bad_value")
    return Identity(cloud="azure", instance_id=vm_id, private_ip=_private_ip(data.get("network")),
                    region=field_str(compute, "location", what, optional=True),
                    zone=field_str(compute, "zone", what, optional=True),
                    vm_name=field_str(compute, "name", what, optional=True))


def _private_ip(network: object) -> str:
    """network.interface[0].ipv4.ipAddress[0].privateIpAddress, or "" where any step is missing."""
    node: object = network
    for key, index in (("interface", 0), ("ipv4", None), ("ipAddress", 0)):
        node = node.get(key) if isinstance(node, dict) else None
        if index is not None:
            node = node[index] if isinstance(node, list) and node else None
    address = node.get("privateIpAddress") if isinstance(node, dict) else None
    return address if isinstance(address, str) else ""
