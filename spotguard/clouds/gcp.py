"""Google Cloud: preemption and host-maintenance notices from the GCE metadata server.

Two sources, each a hanging GET (``wait_for_change``) so a change reaches us as soon as the metadata
server sees it, and neither waits on the other:

    instance/preempted           TRUE                            -> preemption         drain, detection + [gcp] window
    instance/maintenance-event   TERMINATE_ON_HOST_MAINTENANCE   -> maintenance-event  drain at window start
                                                                    - [gcp] maintenance_lead
                                 MIGRATE_ON_HOST_MAINTENANCE     -> maintenance-event  observe

maintenance-event changes 60 s before the host event for most VMs but an hour before for GPU VMs
(compute/docs/gpus/gpu-host-maintenance), and the value does not say which. So when it turns
TERMINATE_ON_HOST_MAINTENANCE we read ``instance/upcoming-maintenance?alt=json``
(compute/docs/instances/monitor-plan-host-maintenance-event): its ``window_start_time`` is the real
deadline, and the drain starts ``[gcp] maintenance_lead`` before it. Where that key is missing, empty
(``{ }``), unreadable or its window already open, the deadline is detection + 60 s and the drain starts
at once: early is safe, late is not.

When hanging GETs keep failing (a proxy cutting long requests, a server that refuses them) a source
drops to plain GETs (``hanging`` turns False so the runner paces it) and tries hanging again later.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import httpx
import structlog

from spotguard.clouds import fetch
from spotguard.clouds._parse import FirstSeen, Seen, header, iso_time, json_object, shift
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.errors import MalformedMetadata, MetadataError, MetadataUnavailable
from spotguard.notice import Notice, stable_id

PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
UPCOMING_PATH = "/computeMetadata/v1/instance/upcoming-maintenance"
ID_PATH = "/computeMetadata/v1/instance/id"
NAME_PATH = "/computeMetadata/v1/instance/name"
ZONE_PATH = "/computeMetadata/v1/instance/zone"
IP_PATH = "/computeMetadata/v1/instance/network-interfaces/0/ip"
FLAVOR = {"Metadata-Flavor": "Google"}

SOURCE = "gcp"
MAINTENANCE_WINDOW = 60.0
"""maintenance-event changes at least 60 s before the host event (an hour for GPU VMs)."""
TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
FALLBACK_AFTER_FAILURES = 3
"""Consecutive failed hanging GETs before falling back to plain GETs (one failure is just a blip)."""
HANGING_RETRY_AFTER = 300.0
"""Seconds in plain mode before trying hanging GETs again (whatever broke them may have been fixed)."""

_VALUE = re.compile(r"[A-Z_]{1,64}")


# ---- pure parsers ---------------------------------------------------------------------------------

def parse_preempted(text: str, etag: str, seen: Seen, *, window: float) -> list[Notice]:
    """``TRUE`` -> one preemption notice (id stable while the value, hence its ETag, is unchanged)."""
    value = text.strip()
    if value == "FALSE":
        return []
    if value != "TRUE":
        raise MalformedMetadata(f"instance/preempted: expected TRUE or FALSE, got {value[:40]!r}",
                                reason="bad_value")
    event_id = stable_id(SOURCE, "preempted", etag)
    detected = seen(event_id)
    return [Notice(source=SOURCE, kind="preemption", event_id=event_id,
                   deadline=shift(detected, window, "instance/preempted"), detected_at=detected, payload=value)]


def parse_maintenance(text: str, etag: str, seen: Seen, *, window_start: datetime | None = None,
                      lead: float = 0.0) -> list[Notice]:
    """TERMINATE_ON_HOST_MAINTENANCE -> drain; MIGRATE_ON_HOST_MAINTENANCE (or a new value) -> observe.

    ``window_start`` (from upcoming-maintenance) is the deadline when it is still ahead; the drain then
    starts ``lead`` seconds before it. Otherwise the deadline is detection + 60 s, acting at once.
    """
    value = text.strip()
    if not _VALUE.fullmatch(value):
        raise MalformedMetadata(f"instance/maintenance-event: unexpected {value[:40]!r}", reason="bad_value")
    if value == "NONE":
        return []
    event_id = stable_id(SOURCE, "maintenance-event", value, etag)
    detected = seen(event_id)
    deadline = shift(detected, MAINTENANCE_WINDOW, "instance/maintenance-event")
    act_at = None
    if window_start is not None and window_start > deadline:
        deadline = window_start
        start = shift(window_start, -lead, "instance/upcoming-maintenance")
        act_at = start if start > detected else None
    return [Notice(source=SOURCE, kind="maintenance-event", event_id=event_id, deadline=deadline,
                   detected_at=detected, action="drain" if value == TERMINATE else "observe", act_at=act_at,
                   payload=value)]


def parse_upcoming(text: str) -> datetime | None:
    """``window_start_time`` of upcoming-maintenance?alt=json; None when nothing is scheduled.

    Nothing scheduled reads ``{ }``; some hosts answer ``NONE`` or ``{"error": "no notifications have
    been received yet, ..."}`` instead.
    """
    what = "instance/upcoming-maintenance"
    if text.strip() in ("", "NONE"):
        return None
    data = json_object(text, what)
    if not data or "error" in data:
        return None
    start = data.get("window_start_time")
    if not isinstance(start, str) or not start:
        raise MalformedMetadata(f"{what}: no window_start_time", reason="bad_shape")
    return iso_time(start, what)


# ---- I/O ------------------------------------------------------------------------------------------

def _checked(response: fetch.MetadataResponse, path: str) -> fetch.MetadataResponse:
    if response.status != 200:
        # the GCE endpoints always exist: 400/403/404 mean something is wrong, not "no notice"
        raise MetadataUnavailable(f"GET {path}: HTTP {response.status}", reason=f"status_{response.status}")
    if header(response.headers, "Metadata-Flavor") != "Google":
        raise MalformedMetadata(f"GET {path}: answer lacks Metadata-Flavor: Google (not the metadata server)",
                                reason="not_google")
    return response


class GcpWatch:
    """One metadata value watched with hanging GETs; ``poll`` blocks until it changes or the wait ends."""

    def __init__(self, name: str, config: Config, http: httpx.AsyncClient, path: str,
                 parse: Callable[[str, str, Seen], list[Notice]], *,
                 hang_again_after: float = HANGING_RETRY_AFTER,
                 enrich: Callable[[str, str, Seen], Awaitable[list[Notice]]] | None = None) -> None:
        self.name = name
        self.hanging = True
        self.interval: float | None = None  # when hanging GETs fail it falls back to [agent] poll_interval
        self._url = config.gcp.metadata_url.rstrip("/") + path
        self._path = path
        self._http = http
        self._parse = parse
        self._enrich = enrich
        """Used instead of ``parse`` where a value needs another read to become notices."""
        self._wait = config.gcp.hanging_timeout
        self._timeout = config.agent.request_timeout
        self._etag = "0"  # "0" never matches: the first hanging GET answers at once with value + ETag
        self._failures = 0
        self._hang_again_at = 0.0
        self._hang_again_after = hang_again_after
        self._seen = FirstSeen()
        self._log = structlog.get_logger("spotguard.clouds.gcp").bind(source=name)

    async def poll(self) -> Sequence[Notice]:
        if not self.hanging and time.monotonic() >= self._hang_again_at:
            self._log.info("gcp_hanging_retry")
            self.hanging, self._failures = True, 0
        response = await (self._hanging_get() if self.hanging else self._plain_get())
        etag = header(response.headers, "ETag")
        if self._enrich is not None:
            notices = list(await self._enrich(response.text, etag, self._seen))
        else:
            notices = self._parse(response.text, etag, self._seen)
        if etag:
            self._etag = etag
        self._seen.keep(n.event_id for n in notices)
        return notices

    async def _hanging_get(self) -> fetch.MetadataResponse:
        sent = self._etag
        params = {"wait_for_change": "true", "last_etag": sent, "timeout_sec": str(self._wait)}
        started = time.monotonic()
        try:
            # the server holds the request for up to timeout_sec; our own limit adds one request's time
            response = _checked(await fetch.request(self._http, "GET", self._url, headers=FLAVOR, params=params,
                                                    timeout=self._wait + self._timeout), self._path)
            if not header(response.headers, "ETag"):
                raise MalformedMetadata(f"GET {self._path}: hanging answer without an ETag", reason="no_etag")
        except MetadataError as exc:
            self._failed(exc.reason)
            raise
        if header(response.headers, "ETag") == sent and time.monotonic() - started < self._wait / 2:
            # an unchanged value returned long before timeout_sec: something in the way does not hang,
            # and left alone the runner would ask again at once, forever; the answer itself is still good
            self._failed("not_hanging")
        else:
            self._failures = 0
        return response

    def _failed(self, reason: str) -> None:
        self._failures += 1
        if self._failures >= FALLBACK_AFTER_FAILURES:
            self._log.warning("gcp_hanging_fallback", failures=self._failures, reason=reason,
                              retry_in=self._hang_again_after)
            self.hanging = False
            self._hang_again_at = time.monotonic() + self._hang_again_after

    async def _plain_get(self) -> fetch.MetadataResponse:
        return _checked(await fetch.request(self._http, "GET", self._url, headers=FLAVOR, timeout=self._timeout),
                        self._path)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the daemon."""


async def window_start(config: Config, http: httpx.AsyncClient) -> datetime | None:
    """The announced host-maintenance window start, or None when there is none or it cannot be read."""
    url = config.gcp.metadata_url.rstrip("/") + UPCOMING_PATH
    log = structlog.get_logger("spotguard.clouds.gcp")
    try:
        response = await fetch.request(http, "GET", url, headers=FLAVOR, params={"alt": "json"},
                                       timeout=config.agent.request_timeout)
        if response.status == 404:
            return None  # a machine type without the key: nothing announced
        return parse_upcoming(_checked(response, UPCOMING_PATH).text)
    except MetadataError as exc:
        log.warning("gcp_upcoming_maintenance_unreadable", error=str(exc), reason=exc.reason)
        return None


def build_sources(config: Config, http: httpx.AsyncClient) -> list[GcpWatch]:
    window = config.gcp.window
    lead = config.gcp.maintenance_lead

    async def maintenance(text: str, etag: str, seen: Seen) -> list[Notice]:
        start = await window_start(config, http) if text.strip() == TERMINATE else None
        return parse_maintenance(text, etag, seen, window_start=start, lead=lead)

    return [
        GcpWatch("gcp-preempted", config, http, PREEMPTED_PATH,
                 lambda text, etag, seen: parse_preempted(text, etag, seen, window=window)),
        GcpWatch("gcp-maintenance", config, http, MAINTENANCE_PATH, parse_maintenance, enrich=maintenance),
    ]


async def identity(config: Config, http: httpx.AsyncClient) -> Identity:
    """Instance id, name, zone (``projects/N/zones/Z`` -> Z), region and internal IP."""
    base = config.gcp.metadata_url.rstrip("/")

    async def text(path: str) -> str:
        response = _checked(await fetch.request(http, "GET", base + path, headers=FLAVOR,
                                                timeout=config.agent.request_timeout), path)
        value = response.text.strip()
        if not value or len(value) > 255 or not value.isprintable():
            raise MalformedMetadata(f"GET {path}: not a plain value", reason="bad_value")
        return value

    zone = (await text(ZONE_PATH)).rpartition("/")[2]
    return Identity(cloud="gcp", instance_id=await text(ID_PATH), private_ip=await text(IP_PATH),
                    region=zone.rpartition("-")[0], zone=zone, vm_name=await text(NAME_PATH))
