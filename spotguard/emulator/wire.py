"""What the emulator's cloud modules share: the request/reply values, control-API input checks, dates."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class Request:
    """One metadata request, already read off the wire."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Lower-case names."""
    body: bytes = b""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes | str = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = field(default=())


def json_reply(value: Any, status: int = 200, *, content_type: str = "application/json",
               headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps(value), content_type, headers)


class BadRequest(ValueError):
    """Control-API input that cannot be used; answered with 400 and this message."""


class UnknownNotice(LookupError):
    """A control-API call named an event id that is not (or no longer) raised; answered with 404."""


class Params:
    """Typed access to a control-API JSON object; every key must be read, so typos are reported."""

    def __init__(self, data: Mapping[str, Any], what: str) -> None:
        self._data = dict(data)
        self._what = what
        self._seen: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, kinds: tuple[type, ...], default: Any) -> Any:
        self._seen.add(key)
        value = self._data.get(key, default)
        if value is default:
            return value
        # bool is an int in Python; a flag given as 1 or a number given as true is a typo, not a value
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise BadRequest(f"{self._what}: {key!r} must be {names}, got {value!r}")
        return value

    def text(self, key: str, default: str) -> str:
        return str(self._get(key, (str,), default))

    def optional_text(self, key: str) -> str | None:
        value = self._get(key, (str,), None)
        return None if value is None else str(value)

    def number(self, key: str, default: float) -> float:
        return float(self._get(key, (int, float), default))

    def optional_number(self, key: str) -> float | None:
        value = self._get(key, (int, float), None)
        return None if value is None else float(value)

    def integer(self, key: str, default: int) -> int:
        return int(self._get(key, (int,), default))

    def optional_integer(self, key: str) -> int | None:
        value = self._get(key, (int,), None)
        return None if value is None else int(value)

    def flag(self, key: str, default: bool) -> bool:
        return bool(self._get(key, (bool,), default))

    def texts(self, key: str, default: list[str]) -> list[str]:
        value = self._get(key, (list,), default)
        if not all(isinstance(item, str) for item in value):
            raise BadRequest(f"{self._what}: {key!r} must be a list of strings, got {value!r}")
        return list(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise BadRequest(f"{self._what}: {key!r} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def done(self) -> None:
        """Refuse keys nobody read: a misspelt parameter must not be silently ignored."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise BadRequest(f"{self._what}: unknown parameter(s) {', '.join(unknown)}")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_seconds(moment: datetime) -> str:
    """AWS spot/rebalance times: ``2017-09-18T08:22:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc1123(moment: datetime) -> str:
    """Azure NotBefore: ``Mon, 11 Apr 2022 22:26:58 GMT`` (locale-independent)."""
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def aws_event_date(moment: datetime) -> str:
    """AWS scheduled-event dates: ``21 Jan 2019 09:00:43 GMT`` (RFC 1123 without the weekday)."""
    return rfc1123(moment).split(", ", 1)[1]


class CloudMetadata(Protocol):
    """One cloud's metadata service inside the emulator: serves requests, holds that cloud's notices."""

    name: str
    prefix: str
    """Path prefix of its metadata; the app routes on it (the three clouds' prefixes do not overlap)."""

    async def handle(self, request: Request) -> Reply: ...

    def raise_notice(self, kind: str, params: Params) -> str: ...

    def change(self, event_id: str, params: Params) -> None: ...

    def withdraw(self, event_id: str) -> None: ...

    def expire_tokens(self) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def close(self) -> None:
        """Wake every request that is waiting (hanging GETs) so the server can stop at once."""
