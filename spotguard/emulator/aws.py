"""EC2 instance metadata (IMDSv2): session tokens, spot/rebalance/scheduled/lifecycle notices, identity."""

from __future__ import annotations

import json
import secrets
import time
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
    aws_event_date,
    iso_seconds,
    utcnow,
)
from spotguard.notice import parse_rfc3339

PREFIX = "/latest/"
TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
MAX_TTL = 21600
COMPACT = (",", ":")
"""IMDS writes its JSON without spaces."""
MAX_TOKENS = 10_000
"""Expired tokens are pruned past this many, so a client looping on PUT cannot grow memory forever."""

SPOT_ACTIONS = ("terminate", "stop", "hibernate")
SCHEDULED_CODES = ("instance-reboot", "system-reboot", "system-maintenance", "instance-retirement", "instance-stop")
SCHEDULED_STATES = ("active", "completed", "canceled")
LIFECYCLE_STATES = ("InService", "Terminated", "Detached", "Standby", "Pending", "Warmed:Pending",
                    "Warmed:Running", "Warmed:Stopped", "Warmed:Hibernated", "Warmed:Terminated")


def _html(status: int, title: str) -> Reply:
    # IMDS answers errors with a small XHTML page, not JSON; clients must not try to parse it
    body = (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f' <head>\n  <title>{status} - {title}</title>\n </head>\n'
        f' <body>\n  <h1>{status} - {title}</h1>\n </body>\n</html>\n'
    )
    return Reply(status, body, "text/html", (("server", "EC2ws"),))


def _text(value: str, content_type: str = "text/plain") -> Reply:
    return Reply(200, value, content_type, (("server", "EC2ws"),))


@dataclass(frozen=True)
class SpotNotice:
    event_id: str
    action: str
    time: datetime


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    code: str
    state: str
    description: str
    not_before: datetime
    not_after: datetime | None
    not_before_deadline: datetime | None

    def to_json(self) -> dict[str, str]:
        body = {
            "Code": self.code, "Description": self.description, "EventId": self.event_id,
            "NotBefore": aws_event_date(self.not_before),
            "NotAfter": aws_event_date(self.not_after) if self.not_after else "",
            "State": self.state,
        }
        if self.not_before_deadline:
            body["NotBeforeDeadline"] = aws_event_date(self.not_before_deadline)
        return body


class AwsMetadata:
    """One instance's IMDS; ``require_v2`` False also serves requests without a token (IMDSv1)."""

    name = "aws"
    prefix = PREFIX

    def __init__(self, instance: EmulatedInstance, *, require_v2: bool = True) -> None:
        self.instance = instance
        self.require_v2 = require_v2
        self._tokens: dict[str, float] = {}
        self.spot: SpotNotice | None = None
        self.rebalance: tuple[str, datetime] | None = None
        self.scheduled: dict[str, ScheduledEvent] = {}
        self.lifecycle: tuple[str, str] | None = None
        self.lifecycle_state: str | None = None
        """None until an ASG sets it: the path answers 404 on a brand-new instance."""

    # -- metadata requests ---------------------------------------------------------------------

    async def handle(self, request: Request) -> Reply:
        if "x-forwarded-for" in request.headers:
            return _html(403, "Forbidden")
        if request.path == TOKEN_PATH:
            return self._token(request)
        if request.method != "GET":
            return _html(405, "Method Not Allowed")
        token = request.headers.get(TOKEN_HEADER)
        if token is not None and not self._valid(token):
            return _html(401, "Unauthorized")
        if token is None and self.require_v2:
            return _html(401, "Unauthorized")
        return self._get(request.path)

    def _token(self, request: Request) -> Reply:
        if request.method != "PUT":
            return _html(405, "Method Not Allowed")
        raw = request.headers.get(TTL_HEADER, "")
        if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_TTL:
            return _html(400, "Bad Request")
        ttl = int(raw)
        now = time.monotonic()
        if len(self._tokens) >= MAX_TOKENS:
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        token = secrets.token_urlsafe(42)
        self._tokens[token] = now + ttl
        return Reply(200, token, "text/plain", (("server", "EC2ws"), (TTL_HEADER, str(ttl))))

    def _valid(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def expire_tokens(self) -> None:
        self._tokens.clear()

    def _get(self, path: str) -> Reply:
        i = self.instance
        meta = path.removeprefix("/latest/meta-data")
        values = {
            "/instance-id": i.instance_id, "/local-ipv4": i.local_ipv4, "/mac": i.mac,
            "/placement/region": i.region, "/placement/availability-zone": i.availability_zone,
            "/instance-type": i.instance_type,
            "/local-hostname": f"ip-{i.local_ipv4.replace('.', '-')}.ec2.internal",
        }
        if path.startswith("/latest/meta-data") and meta in values:
            return _text(values[meta])
        if meta in ("", "/"):
            names = sorted({key.strip("/").split("/")[0] + ("/" if key.count("/") > 1 else "")
                            for key in values} | {"autoscaling/", "events/", "spot/"})
            return _text("\n".join(names))
        if meta == "/spot/instance-action" and self.spot:
            return _text(json.dumps({"action": self.spot.action, "time": iso_seconds(self.spot.time)}, separators=COMPACT))
        if meta == "/spot/termination-time" and self.spot and self.spot.action == "terminate":
            return _text(iso_seconds(self.spot.time))
        if meta == "/events/recommendations/rebalance" and self.rebalance:
            return _text(json.dumps({"noticeTime": iso_seconds(self.rebalance[1])}, separators=COMPACT))
        if meta == "/events/maintenance/scheduled":
            return _text(json.dumps([event.to_json() for event in self.scheduled.values()]))
        if meta == "/autoscaling/target-lifecycle-state" and self.lifecycle_state:
            return _text(self.lifecycle_state)
        if path == "/latest/dynamic/instance-identity/document":
            return _text(json.dumps({
                "accountId": "123456789012", "architecture": "x86_64", "availabilityZone": i.availability_zone,
                "imageId": "ami-0123456789abcdef0", "instanceId": i.instance_id, "instanceType": i.instance_type,
                "privateIp": i.local_ipv4, "region": i.region, "version": "2017-09-30",
            }, indent=2))
        return _html(404, "Not Found")

    # -- control API ---------------------------------------------------------------------------

    def raise_notice(self, kind: str, params: Params) -> str:
        now = utcnow()
        if kind == "spot":
            spot = SpotNotice(f"spot-{secrets.token_hex(8)}", params.choice("action", "terminate", SPOT_ACTIONS),
                              self._when(params, now, 120.0))
            params.done()
            self.spot = spot  # only one spot action exists at a time: a new one replaces the old
            return spot.event_id
        if kind == "rebalance":
            event_id = f"rebalance-{secrets.token_hex(8)}"
            params.done()
            self.rebalance = (event_id, now)
            return event_id
        if kind == "scheduled":
            event_id = params.optional_text("event_id") or f"instance-event-{secrets.token_hex(9)[:17]}"
            if event_id in self.scheduled:
                raise BadRequest(f"aws scheduled event {event_id} already exists")
            not_before = now + timedelta(seconds=params.number("not_before_in_seconds", 3600.0))
            deadline = params.optional_number("not_before_deadline_in_seconds")
            event = ScheduledEvent(
                event_id=event_id,
                code=params.choice("code", "system-maintenance", SCHEDULED_CODES),
                state=params.choice("state", "active", SCHEDULED_STATES),
                description=params.text("description", "scheduled system maintenance"),
                not_before=not_before,
                not_after=self._not_after(params, now, not_before),
                not_before_deadline=None if deadline is None else now + timedelta(seconds=deadline),
            )
            params.done()
            self.scheduled[event_id] = event
            return event_id
        if kind == "lifecycle":
            event_id = f"lifecycle-{secrets.token_hex(8)}"
            lifecycle_state = params.choice("state", "Terminated", LIFECYCLE_STATES)
            params.done()
            self.lifecycle = (event_id, lifecycle_state)
            self.lifecycle_state = lifecycle_state
            return event_id
        raise BadRequest(f"aws: unknown notice kind {kind!r}; one of spot, rebalance, scheduled, lifecycle")

    @staticmethod
    def _when(params: Params, now: datetime, default_in: float) -> datetime:
        moment = params.optional_text("time")
        in_seconds = params.optional_number("in_seconds")
        if moment is not None and in_seconds is not None:
            raise BadRequest("aws spot: give either 'time' or 'in_seconds', not both")
        if moment is not None:
            try:
                return parse_rfc3339(moment)
            except ValueError:
                raise BadRequest(f"aws spot: 'time' is not an RFC 3339 time: {moment!r}") from None
        return now + timedelta(seconds=default_in if in_seconds is None else in_seconds)

    @staticmethod
    def _not_after(params: Params, now: datetime, not_before: datetime) -> datetime | None:
        if "not_after_in_seconds" in params:
            seconds = params.optional_number("not_after_in_seconds")
            return None if seconds is None else now + timedelta(seconds=seconds)  # null = empty NotAfter
        return not_before + timedelta(hours=2)

    def change(self, event_id: str, params: Params) -> None:
        now = utcnow()
        if self.spot and self.spot.event_id == event_id:
            action = params.choice("action", self.spot.action, SPOT_ACTIONS)
            moved = "time" in params or "in_seconds" in params
            when = self._when(params, now, 120.0) if moved else self.spot.time
            params.done()
            self.spot = replace(self.spot, action=action, time=when)
        elif self.lifecycle and self.lifecycle[0] == event_id:
            lifecycle_state = params.choice("state", self.lifecycle[1], LIFECYCLE_STATES)
            params.done()
            self.lifecycle = (event_id, lifecycle_state)
            self.lifecycle_state = lifecycle_state
        elif event_id in self.scheduled:
            old = self.scheduled[event_id]
            not_before = old.not_before
            if "not_before_in_seconds" in params:
                not_before = now + timedelta(seconds=params.number("not_before_in_seconds", 0.0))
            not_after = self._not_after(params, now, not_before) if "not_after_in_seconds" in params else old.not_after
            event = replace(
                old, state=params.choice("state", old.state, SCHEDULED_STATES),
                code=params.choice("code", old.code, SCHEDULED_CODES),
                description=params.text("description", old.description),
                not_before=not_before, not_after=not_after)
            params.done()
            self.scheduled[event_id] = event
        elif self.rebalance and self.rebalance[0] == event_id:
            params.done()  # a recommendation has nothing to change; unknown params are still refused
        else:
            raise UnknownNotice(f"aws: no notice with event id {event_id}")

    def withdraw(self, event_id: str) -> None:
        if self.spot and self.spot.event_id == event_id:
            self.spot = None
        elif self.rebalance and self.rebalance[0] == event_id:
            self.rebalance = None
        elif self.lifecycle and self.lifecycle[0] == event_id:
            self.lifecycle = None
            self.lifecycle_state = "InService"
        elif self.scheduled.pop(event_id, None) is None:
            raise UnknownNotice(f"aws: no notice with event id {event_id}")

    def state(self) -> dict[str, Any]:
        return {
            "require_v2": self.require_v2,
            "live_tokens": sum(1 for exp in self._tokens.values() if exp > time.monotonic()),
            "spot": None if not self.spot else {"event_id": self.spot.event_id, "action": self.spot.action,
                                                "time": iso_seconds(self.spot.time)},
            "rebalance": None if not self.rebalance else {"event_id": self.rebalance[0],
                                                          "noticeTime": iso_seconds(self.rebalance[1])},
            "scheduled": [event.to_json() for event in self.scheduled.values()],
            "lifecycle_state": self.lifecycle_state,
        }

    def close(self) -> None:
        """Nothing waits here."""
