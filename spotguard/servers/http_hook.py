"""kind = http: any engine with an HTTP call that stops it and one that reports its in-flight count."""

from __future__ import annotations

import json
import math

import httpx

from spotguard.errors import ConfigError, EngineError, ManualActionRequired
from spotguard.servers.call import call, expect_ok, parse_json

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def follow(document: object, path: str, source: str) -> object:
    """The value at dotted ``path`` (``a.b.0.c``; numbers index lists) in ``document``."""
    value = document
    for part in path.split(".") if path else ():
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and _index(part, len(value)) is not None:
            value = value[int(part)]
        else:
            raise EngineError(f"{source}: no {part!r} on the path {path!r} ([server] inflight_json_path)")
    return value


def _index(part: str, length: int) -> int | None:
    digits = part.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(part) if -length <= int(part) < length else None


def as_count(value: object, source: str) -> int:
    """A non-negative whole number (JSON int, integral float, or digits in a string)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    raise EngineError(f"{source}: {json.dumps(value)[:60]} is not an in-flight count")


class HttpHookAdapter:
    name = "http"

    def __init__(self, *, http: httpx.AsyncClient, stop_url: str, stop_method: str, stop_body: str,
                 inflight_url: str, inflight_json_path: str, timeout: float) -> None:
        if not stop_url:
            raise ConfigError("[server] stop_url must be set for kind = http")
        method = stop_method.upper()
        if method not in METHODS:
            raise ConfigError(f"[server] stop_method: {stop_method!r} is not one of {', '.join(METHODS)}")
        if stop_body:
            try:
                json.loads(stop_body)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"[server] stop_body is not JSON: {exc.msg} at {exc.pos}") from None
        self.http = http
        self.stop_url = stop_url
        self.stop_method = method
        self.stop_body = stop_body
        self.inflight_url = inflight_url
        self.inflight_json_path = inflight_json_path
        self.timeout = timeout

    async def stop_accepting(self, *, dry_run: bool) -> str:
        what = f"{self.stop_method} {self.stop_url}"
        if dry_run:
            size = len(self.stop_body.encode())
            return f"would send {what}" + (f" with a {size}-byte JSON body" if size else "")
        body = self.stop_body.encode() if self.stop_body else None
        headers = {"content-type": "application/json"} if body is not None else None
        response = await call(self.http, self.stop_method, self.stop_url, timeout=self.timeout, content=body,
                              headers=headers)
        expect_ok(response, what)
        return f"{what}: HTTP {response.status}"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        message = (f"the engine was stopped by {self.stop_method} {self.stop_url} and spotguard has no call to "
                   "undo it: restart the engine (or re-enable it) by hand")
        if dry_run:
            return f"would not restart: {message}"
        raise ManualActionRequired(message)

    async def inflight(self) -> int | None:
        if not self.inflight_url:
            return None
        source = f"GET {self.inflight_url}"
        response = await call(self.http, "GET", self.inflight_url, timeout=self.timeout)
        expect_ok(response, source)
        return as_count(follow(parse_json(response, source), self.inflight_json_path, source), source)
