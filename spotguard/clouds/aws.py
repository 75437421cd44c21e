"""AWS: EC2 instance metadata (IMDSv2) notices.

One source per IMDS document, so a garbled maintenance list never hides a spot interruption; they
share one ``ImdsSession`` (one token) and the runner polls them side by side each tick:

    spot/instance-action                  -> spot-interruption         drain, deadline = its time
    events/recommendations/rebalance      -> rebalance-recommendation  [aws] rebalance_action
    events/maintenance/scheduled          -> scheduled-event           drain at NotBefore - scheduled_lead
    autoscaling/target-lifecycle-state    -> asg-terminated            drain, detection + ASG_WINDOW

404 means "no notice". A notice missing from a later poll has been withdrawn (the runner's diff).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence

import anyio
import httpx

from spotguard.clouds import fetch
from spotguard.clouds._parse import (
    FirstSeen,
    Seen,
    field_str,
    http_time,
    iso_time,
    json_object,
    json_value,
    shift,
)
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.errors import MalformedMetadata, MetadataUnavailable
from spotguard.notice import Action, Notice, stable_id

TOKEN_PATH = "/latest/api/token"
SPOT_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
SCHEDULED_PATH = "/latest/meta-data/events/maintenance/scheduled"
LIFECYCLE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
LOCAL_IPV4_PATH = "/latest/meta-data/local-ipv4"
REGION_PATH = "/latest/meta-data/placement/region"
ZONE_PATH = "/latest/meta-data/placement/availability-zone"

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"

SOURCE = "aws"
REBALANCE_WINDOW = 120.0
"""A rebalance recommendation has no deadline of its own; AWS says the 2-minute interruption notice
may follow at any time (even together with it), so we plan as if it were one, counted from noticeTime."""
ASG_WINDOW = 120.0
"""target-lifecycle-state carries no time. Without a lifecycle hook the ASG terminates the instance as
soon as it moves to Terminating, so we assume the same 2 minutes a spot notice gives (the hook, when
configured, is heartbeated by the AWS load-balancer module and buys more)."""

_LIFECYCLE = re.compile(r"[A-Za-z]+(?::[A-Za-z]+)*")
_TOKEN = re.compile(r"[A-Za-z0-9+/=_.\-]{1,2048}")


# ---- pure parsers ---------------------------------------------------------------------------------

def parse_instance_action(text: str, seen: Seen) -> list[Notice]:
    """``{"action": "terminate", "time": "..."}`` -> one spot-interruption notice."""
    what = "spot/instance-action"
    data = json_object(text, what)
    action = field_str(data, "action", what)
    if action not in ("terminate", "stop", "hibernate"):
        raise MalformedMetadata(f"{what}: unknown action {action[:40]!r}", reason="bad_value")
    when = iso_time(field_str(data, "time", what), what)
    event_id = stable_id(SOURCE, "instance-action", action, when.isoformat())
    return [Notice(source=SOURCE, kind="spot-interruption", event_id=event_id, deadline=when,
                   detected_at=seen(event_id), payload=text)]


def parse_rebalance(text: str, seen: Seen, *, action: Action = "observe") -> list[Notice]:
    """``{"noticeTime": "..."}`` -> one rebalance-recommendation notice, deadline noticeTime + 120 s."""
    what = "events/recommendations/rebalance"
    data = json_object(text, what)
    notice_time = iso_time(field_str(data, "noticeTime", what), what)
    event_id = stable_id(SOURCE, "rebalance", notice_time.isoformat())
    return [Notice(source=SOURCE, kind="rebalance-recommendation", event_id=event_id,
                   deadline=shift(notice_time, REBALANCE_WINDOW, what), detected_at=seen(event_id),
                   action=action, payload=text)]


def parse_scheduled(text: str, seen: Seen, *, lead: float) -> list[Notice]:
    """The scheduled-events array -> one notice per *active* event; canceled/completed ones are gone."""
    what = "events/maintenance/scheduled"
    events = json_value(text, what)
    if not isinstance(events, list):
        raise MalformedMetadata(f"{what}: expected a JSON array", reason="bad_shape")
    notices: list[Notice] = []
    for event in events:
        if not isinstance(event, dict):
            raise MalformedMetadata(f"{what}: each event must be an object", reason="bad_shape")
        state = field_str(event, "State", what)
        event_id = field_str(event, "EventId", what)
        field_str(event, "Code", what)
        if not event_id:
            raise MalformedMetadata(f"{what}: empty EventId", reason="bad_value")
        if state != "active":  # completed, canceled, and states AWS may add later: nothing to do
            continue
        not_before = http_time(field_str(event, "NotBefore", what), what)
        notices.append(Notice(source=SOURCE, kind="scheduled-event", event_id=event_id, deadline=not_before,
                              detected_at=seen(event_id), act_at=shift(not_before, -lead, what),
                              payload=json.dumps(event, sort_keys=True)))
    return notices


def parse_lifecycle(text: str, seen: Seen) -> list[Notice]:
    """``Terminated`` -> one asg-terminated notice; other states (InService, Standby, ...) -> none."""
    state = text.strip()
    if not _LIFECYCLE.fullmatch(state) or len(state) > 64:
        raise MalformedMetadata(f"autoscaling/target-lifecycle-state: unexpected {state[:40]!r}",
                                reason="bad_value")
    if state != "Terminated":
        return []
    event_id = stable_id(SOURCE, "target-lifecycle-state", state)
    detected = seen(event_id)
    return [Notice(source=SOURCE, kind="asg-terminated", event_id=event_id,
                   deadline=shift(detected, ASG_WINDOW, "target-lifecycle-state"), detected_at=detected,
                   payload=state)]


# ---- I/O ------------------------------------------------------------------------------------------

class ImdsSession:
    """GETs against IMDS with one shared IMDSv2 token, refreshed before it expires and after a 401."""

    def __init__(self, config: Config, http: httpx.AsyncClient, *, timeout: float | None = None) -> None:
        self._base = config.aws.metadata_url.rstrip("/")
        self._v2 = config.aws.imds_version == "v2"
        self._ttl = config.aws.token_ttl
        self._timeout = config.agent.request_timeout if timeout is None else timeout
        self._http = http
        self._token = ""
        self._refresh_at = 0.0
        self._lock = anyio.Lock()

    async def get(self, path: str) -> fetch.MetadataResponse:
        """One GET; on 401 a new token and one retry. Returns 200/404 answers, raises on the rest."""
        token = await self._current_token()
        response = await self._get(path, token)
        if response.status == 401 and self._v2:
            response = await self._get(path, await self._current_token(stale=token))
        if response.status == 401:
            raise MetadataUnavailable(f"GET {path}: 401 with a fresh token", reason="unauthorized")
        if response.status not in (200, 404):
            raise MetadataUnavailable(f"GET {path}: HTTP {response.status}", reason=f"status_{response.status}")
        return response

    async def _get(self, path: str, token: str) -> fetch.MetadataResponse:
        headers = {TOKEN_HEADER: token} if token else {}
        return await fetch.request(self._http, "GET", self._base + path, headers=headers, timeout=self._timeout)

    async def _current_token(self, *, stale: str = "") -> str:
        if not self._v2:
            return ""
        async with self._lock:  # concurrent sources wait for the one PUT instead of each sending theirs
            if self._token and self._token != stale and time.monotonic() < self._refresh_at:
                return self._token
            self._token = await self._put_token()
            # refresh a little before expiry so no request ever carries a token about to lapse
            self._refresh_at = time.monotonic() + self._ttl - min(60.0, self._ttl * 0.25)
            return self._token

    async def _put_token(self) -> str:
        try:
            response = await fetch.request(self._http, "PUT", self._base + TOKEN_PATH,
                                           headers={TTL_HEADER: str(self._ttl)}, timeout=self._timeout)
        except MetadataUnavailable as exc:
            hint = " (in a container, the instance's metadata hop limit may need to be 2)" \
                if exc.reason == "timeout" else ""
            raise MetadataUnavailable(f"IMDSv2 token: {exc}{hint}", reason=f"token_{exc.reason}") from exc
        if response.status != 200:
            raise MetadataUnavailable(f"PUT {TOKEN_PATH}: HTTP {response.status}",
                                      reason=f"token_status_{response.status}")
        token = response.text.strip()
        if not _TOKEN.fullmatch(token):
            raise MalformedMetadata(f"PUT {TOKEN_PATH}: the answer is not a token", reason="bad_token")
        return token


class AwsSource:
    """One IMDS document polled once per tick; ``poll`` returns the notices it holds right now."""

    hanging = False

    def __init__(self, name: str, session: ImdsSession, path: str,
                 parse: Callable[[str, Seen], list[Notice]], *, interval: float | None = None) -> None:
        self.name = name
        self.interval = interval
        self._session = session
        self._path = path
        self._parse = parse
        self._seen = FirstSeen()

    async def poll(self) -> Sequence[Notice]:
        response = await self._session.get(self._path)
        notices = [] if response.status == 404 else self._parse(response.text, self._seen)
        self._seen.keep(n.event_id for n in notices)
        return notices

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the daemon."""


def build_sources(config: Config, http: httpx.AsyncClient) -> list[AwsSource]:
    session = ImdsSession(config, http)
    lead = config.aws.scheduled_lead
    action: Action = "drain" if config.aws.rebalance_action == "drain" else "observe"
    # Only the spot notice gives as little as 2 minutes; the others warn minutes to days ahead (or, for
    # the ASG state, wait on a lifecycle hook), and polling four documents every second was most of an
    # idle daemon's CPU on AWS (bench/detect.py).
    slow = config.aws.slow_poll_interval
    return [
        AwsSource("aws-spot", session, SPOT_PATH, parse_instance_action),
        AwsSource("aws-rebalance", session, REBALANCE_PATH,
                  lambda text, seen: parse_rebalance(text, seen, action=action), interval=slow),
        AwsSource("aws-scheduled", session, SCHEDULED_PATH,
                  lambda text, seen: parse_scheduled(text, seen, lead=lead), interval=slow),
        AwsSource("aws-asg", session, LIFECYCLE_PATH, parse_lifecycle, interval=slow),
    ]


async def identity(config: Config, http: httpx.AsyncClient) -> Identity:
    """Instance id (required), private IP, region and zone from IMDS."""
    session = ImdsSession(config, http)

    async def text(path: str, *, required: bool = False) -> str:
        response = await session.get(path)
        value = response.text.strip() if response.status == 200 else ""
        if value and (len(value) > 255 or not value.isprintable()):
            raise MalformedMetadata(f"GET {path}: not a plain value", reason="bad_value")
        if required and not value:
            raise MalformedMetadata(f"GET {path}: empty", reason="bad_value")
        return value

    instance_id = await text(INSTANCE_ID_PATH, required=True)
    zone = await text(ZONE_PATH)
    region = config.aws.region or await text(REGION_PATH) or zone[:-1]
    return Identity(cloud="aws", instance_id=instance_id, private_ip=await text(LOCAL_IPV4_PATH),
                    region=region, zone=zone)
