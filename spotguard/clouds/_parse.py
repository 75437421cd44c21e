"""Small strict parsers shared by the cloud modules: JSON, timestamps, first-seen times.

Every failure is a ``MalformedMetadata`` with a short reason; nothing here raises anything else on
any input, which the hypothesis tests in tests/clouds check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta

from spotguard.errors import MalformedMetadata
from spotguard.notice import utcnow

Seen = Callable[[str], datetime]
"""When an event (by id) was first seen; a new id answers now. Parsers take one so they stay pure."""

_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})")
_HTTP_DATE = re.compile(r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?(\d{1,2}) ([A-Z][a-z]{2}) (\d{4}) "
                        r"(\d{2}):(\d{2}):(\d{2}) (?:GMT|UTC)")
_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}


def json_object(text: str, what: str) -> Mapping[str, object]:
    """``text`` as a JSON object; anything else (HTML, a list, deep nesting) is malformed."""
    value = json_value(text, what)
    if not isinstance(value, dict):
        raise MalformedMetadata(f"{what}: expected a JSON object, got {type(value).__name__}", reason="bad_shape")
    return value


def json_value(text: str, what: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, absurd nesting
        raise MalformedMetadata(f"{what}: not valid JSON", reason="bad_json") from None


def field_str(data: Mapping[str, object], key: str, what: str, *, optional: bool = False) -> str:
    value = data.get(key, "" if optional else None)
    if not isinstance(value, str):
        raise MalformedMetadata(f"{what}: {key!r} must be a string", reason="bad_shape")
    return value


def iso_time(text: str, what: str) -> datetime:
    """An RFC 3339 timestamp with a zone (``2017-09-18T08:22:00Z``), as an aware UTC datetime."""
    if not _ISO.fullmatch(text):
        raise MalformedMetadata(f"{what}: {text[:40]!r} is not an RFC 3339 time", reason="bad_time")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError):
        raise MalformedMetadata(f"{what}: {text[:40]!r} is not a valid time", reason="bad_time") from None


def http_time(text: str, what: str) -> datetime:
    """``21 Jan 2019 09:00:43 GMT`` (AWS) or ``Mon, 11 Apr 2022 22:26:58 GMT`` (Azure), locale-free."""
    match = _HTTP_DATE.fullmatch(text)
    if not match or match.group(2) not in _MONTHS:
        raise MalformedMetadata(f"{what}: {text[:40]!r} is not an HTTP date", reason="bad_time")
    day, month, year, hour, minute, second = match.groups()
    try:
        return datetime(int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second), tzinfo=UTC)
    except ValueError:
        raise MalformedMetadata(f"{what}: {text[:40]!r} is not a valid date", reason="bad_time") from None


def shift(moment: datetime, seconds: float, what: str) -> datetime:
    """``moment`` moved by ``seconds``; a date at the edge of the calendar is malformed, not a crash."""
    try:
        return moment + timedelta(seconds=seconds)
    except OverflowError:
        raise MalformedMetadata(f"{what}: time {moment.isoformat()} out of range", reason="bad_time") from None


class FirstSeen:
    """Remembers when each live event was first seen, so deadlines counted from detection stay put
    across polls (the runner de-duplicates on equal notices, and a moving deadline would never settle)."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._clock = clock
        self._seen: dict[str, datetime] = {}

    def __call__(self, event_id: str) -> datetime:
        if event_id not in self._seen:
            self._seen[event_id] = self._clock()
        return self._seen[event_id]

    def keep(self, event_ids: Iterable[str]) -> None:
        """Forget events that are gone: a notice that comes back later is detected afresh."""
        live = set(event_ids)
        for event_id in [key for key in self._seen if key not in live]:
            del self._seen[event_id]


def header(headers: Mapping[str, str], name: str) -> str:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return ""
