"""GCE metadata server: Metadata-Flavor checks, ETags, hanging GETs on preempted and maintenance-event.

A ``maintenance`` notice that terminates also fills ``instance/upcoming-maintenance`` (JSON, as with
``?alt=json``) with the window GCE announces: the emulated VM has a GPU (g2), whose notice comes an
hour before the window (compute/docs/gpus/gpu-host-maintenance), so the window starts
``window_start_in_seconds`` (default 3600) after the notice. Without maintenance that key is ``{ }``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import timedelta
from typing import Any

import anyio

from spotguard.emulator.instance import EmulatedInstance
from spotguard.emulator.wire import BadRequest, Params, Reply, Request, UnknownNotice, iso_seconds, utcnow

PREFIX = "/computeMetadata/"
V1 = "/computeMetadata/v1/"
MAX_WAIT = 3600
"""Longest hanging GET we hold open (timeout_sec is clamped to it; absent = this)."""
MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
GPU_NOTICE = 3600.0
"""GPU VMs get a one-hour notice before host maintenance (60 s for others)."""
WINDOW_LENGTH = 3600.0
NO_MAINTENANCE = "{ }"
"""What upcoming-maintenance answers when nothing is scheduled."""
HEADERS = (("metadata-flavor", "Google"), ("server", "Metadata Server for VM"))


def _error(status: int, message: str) -> Reply:
    body = (f"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error {status}</title>\n"
            f"  <p><b>{status}.</b> <ins>That's an error.</ins>\n  <p>{message} <ins>That's all we know.</ins>\n")
    return Reply(status, body, "text/html; charset=UTF-8", HEADERS)


class WatchedValue:
    """A metadata value with an ETag; waiters wake the moment it changes (or when the server closes)."""

    def __init__(self, path: str, value: str) -> None:
        self.path = path
        self.value = value
        self.version = 0
        self._changed: anyio.Event | None = None  # created on first wait: needs a running event loop
        self._closed = False

    @property
    def etag(self) -> str:
        return hashlib.sha256(f"{self.path}\x1f{self.version}\x1f{self.value}".encode()).hexdigest()[:16]

    def set(self, value: str) -> None:
        if value == self.value:
            return  # the real server only bumps the ETag when the content changes
        self.value = value
        self.version += 1
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_change(self, timeout: float) -> None:
        if self._closed:
            return
        if self._changed is None:
            self._changed = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._changed.wait()


class GcpMetadata:
    name = "gcp"
    prefix = PREFIX

    def __init__(self, instance: EmulatedInstance) -> None:
        i = instance
        self.instance = instance
        self.preempted = WatchedValue("instance/preempted", "FALSE")
        self.maintenance = WatchedValue("instance/maintenance-event", "NONE")
        self.upcoming = WatchedValue("instance/upcoming-maintenance", NO_MAINTENANCE)
        zone = f"projects/{i.gcp_project_number}/zones/{i.gcp_zone}"
        email = f"{i.gcp_project_number}-compute@developer.gserviceaccount.com"
        static = {
            "instance/id": i.gcp_instance_id, "instance/name": i.gcp_name, "instance/zone": zone,
            "instance/hostname": f"{i.gcp_name}.{i.gcp_zone}.c.{i.gcp_project_id}.internal",
            "instance/network-interfaces/0/ip": i.gcp_ip, "instance/scheduling/preemptible": "TRUE",
            "instance/scheduling/on-host-maintenance": "TERMINATE",
            "instance/machine-type": f"projects/{i.gcp_project_number}/machineTypes/g2-standard-4",
            "instance/service-accounts/default/email": email,
            "project/project-id": i.gcp_project_id, "project/numeric-project-id": i.gcp_project_number,
        }
        self.values = {path: WatchedValue(path, value) for path, value in static.items()}
        self.values.update({self.preempted.path: self.preempted, self.maintenance.path: self.maintenance,
                            self.upcoming.path: self.upcoming})
        self._preempted_id: str | None = None
        self._maintenance_id: str | None = None

    async def handle(self, request: Request) -> Reply:
        if "x-forwarded-for" in request.headers:
            return _error(403, "Your client does not have permission to get URL "
                               f"<code>{request.path}</code> from this server.")
        if request.headers.get("metadata-flavor") != "Google":
            return _error(403, "Your client does not have permission to get URL "
                               f"<code>{request.path}</code> from this server. Missing Metadata-Flavor:Google header.")
        if request.method != "GET":
            return _error(405, "Method not allowed.")
        key = request.path.removeprefix(V1)
        if key == "instance/service-accounts/default/token":
            token = {"access_token": f"ya29.emulated-{secrets.token_urlsafe(24)}", "expires_in": 3599,
                     "token_type": "Bearer"}
            return Reply(200, json.dumps(token), "application/json", HEADERS)
        if not request.path.startswith(V1) or key not in self.values:
            return _error(404, f"The requested URL <code>{request.path}</code> was not found on this server.")
        watched = self.values[key]
        if request.query.get("wait_for_change", "false").lower() == "true":
            try:
                await self._hang(watched, request)
            except BadRequest as exc:
                return _error(400, str(exc))
        content_type = "application/json" if watched is self.upcoming else "application/text"
        return Reply(200, watched.value, content_type, HEADERS + (("etag", watched.etag),))

    async def _hang(self, watched: WatchedValue, request: Request) -> None:
        raw_timeout = request.query.get("timeout_sec", str(MAX_WAIT))
        if not raw_timeout.isdigit():
            raise BadRequest(f"timeout_sec must be a whole number of seconds, got {raw_timeout!r}")
        last_etag = request.query.get("last_etag")
        if last_etag is not None and last_etag != watched.etag:
            return  # the caller is behind: answer at once with what is there now
        await watched.wait_change(min(int(raw_timeout), MAX_WAIT))

    def raise_notice(self, kind: str, params: Params) -> str:
        if kind == "preempted":
            params.done()
            self._preempted_id = f"preempted-{secrets.token_hex(8)}"
            self.preempted.set("TRUE")
            return self._preempted_id
        if kind == "maintenance":
            value = params.choice("value", "TERMINATE_ON_HOST_MAINTENANCE", MAINTENANCE_VALUES)
            window = params.number("window_start_in_seconds", GPU_NOTICE)
            params.done()
            self._maintenance_id = f"maintenance-{secrets.token_hex(8)}"
            self.upcoming.set(self._window(window) if value != "NONE" else NO_MAINTENANCE)
            self.maintenance.set(value)
            return self._maintenance_id
        raise BadRequest(f"gcp: unknown notice kind {kind!r}; one of preempted, maintenance")

    def change(self, event_id: str, params: Params) -> None:
        if event_id == self._maintenance_id:
            value = params.choice("value", self.maintenance.value, MAINTENANCE_VALUES)
            window = params.optional_number("window_start_in_seconds")
            params.done()
            if value == "NONE":
                self.upcoming.set(NO_MAINTENANCE)
            elif window is not None:
                self.upcoming.set(self._window(window))
            self.maintenance.set(value)
        elif event_id == self._preempted_id:
            value = params.choice("value", self.preempted.value, ("TRUE", "FALSE"))
            params.done()
            self.preempted.set(value)
        else:
            raise UnknownNotice(f"gcp: no notice with event id {event_id}")

    def withdraw(self, event_id: str) -> None:
        if event_id == self._maintenance_id:
            self._maintenance_id = None
            self.upcoming.set(NO_MAINTENANCE)
            self.maintenance.set("NONE")
        elif event_id == self._preempted_id:
            self._preempted_id = None
            self.preempted.set("FALSE")
        else:
            raise UnknownNotice(f"gcp: no notice with event id {event_id}")

    @staticmethod
    def _window(start_in: float) -> str:
        """The upcoming-maintenance document (field names and shape as the metadata server's ?alt=json)."""
        start = utcnow() + timedelta(seconds=start_in)
        return json.dumps({
            "can_reschedule": "false", "latest_window_start_time": iso_seconds(start),
            "maintenance_status": "PENDING" if start_in > 0 else "ONGOING", "type": "SCHEDULED",
            "window_end_time": iso_seconds(start + timedelta(seconds=WINDOW_LENGTH)),
            "window_start_time": iso_seconds(start)}, indent=1)

    def expire_tokens(self) -> None:
        """GCE metadata has no session tokens."""

    def state(self) -> dict[str, Any]:
        return {
            "preempted": {"event_id": self._preempted_id, "value": self.preempted.value, "etag": self.preempted.etag},
            "maintenance-event": {"event_id": self._maintenance_id, "value": self.maintenance.value,
                                  "etag": self.maintenance.etag},
            "upcoming-maintenance": json.loads(self.upcoming.value),
        }

    def close(self) -> None:
        for watched in self.values.values():
            watched.close()
