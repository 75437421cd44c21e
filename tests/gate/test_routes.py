"""The gate's path policy as a pure function: defaults, allow_paths, and what engines would decode."""

from __future__ import annotations

import posixpath
from urllib.parse import quote, unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.config import parse_allow
from spotguard.errors import ConfigError
from spotguard.gate.routes import DEFAULT_ROUTES, Routes, check


@pytest.mark.parametrize(("method", "raw", "forwarded"), [
    ("POST", b"/v1/chat/completions", b"/v1/chat/completions"),
    ("POST", b"/v1/completions", b"/v1/completions"),
    ("POST", b"/v1/embeddings", b"/v1/embeddings"),
    ("POST", b"/v1/responses", b"/v1/responses"),
    ("GET", b"/v1/models", b"/v1/models"),
    ("GET", b"/v1/models/tiny-llama", b"/v1/models/tiny-llama"),
    ("HEAD", b"/health", b"/health"),
    ("POST", b"/v1//chat/completions", b"/v1/chat/completions"),
    ("POST", b"/v1/chat/%63ompletions", b"/v1/chat/completions"),
    ("POST", b"/v1/./chat/x/../completions", b"/v1/chat/completions"),
])
def test_the_inference_api_is_forwarded_normalised(method: str, raw: bytes, forwarded: bytes) -> None:
    verdict = check(method, raw)
    assert verdict.allowed and verdict.raw_path == forwarded


@pytest.mark.parametrize(("method", "raw", "why"), [
    ("POST", b"/slots/0", "not part of the inference API"),
    ("POST", b"/%73lots/0", "POST /slots/0 is not part"),  # llama.cpp decodes escapes before routing
    ("POST", b"/v1/chat/completions/../../slots/0", "/slots/0"),
    ("POST", b"/v1/%2e%2e/slots/0", "/slots/0"),
    ("POST", b"/v1/models/..%2F..%2Fslots/0", "/slots/0"),
    ("POST", b"//slots/0", "/slots/0"),
    ("POST", b"/%2573lots/0", "percent-encoded twice"),
    ("POST", b"/..", "climbs above the root"),
    ("POST", b"/v1\\..\\slots", "backslash"),
    ("POST", b"/v1/chat/completions%00", "control character"),
    ("POST", b"/v1/\xff", "not UTF-8"),
    ("GET", b"/v1/chat/completions", "GET /v1/chat/completions is not part"),
    ("POST", b"/pause", "not part"),
    ("POST", b"/sleep?level=1", "not part"),
    ("POST", b"/reset_prefix_cache", "not part"),
    ("POST", b"/flush_cache", "not part"),
    ("POST", b"/abort_request", "not part"),
    ("GET", b"/metrics", "not part"),
    ("POST", b"/v1/models", "not part"),
    ("GET", b"*", "not absolute"),
])
def test_everything_else_is_refused_with_a_reason(method: str, raw: bytes, why: str) -> None:
    verdict = check(method, raw)
    assert not verdict.allowed and why in verdict.reason


def test_allow_paths_open_more() -> None:
    routes = Routes(("/slots/*", "GET /metrics", "/completion"))
    assert routes.check("POST", b"/slots/0").allowed and routes.check("POST", b"/%73lots/1").allowed
    assert not routes.check("POST", b"/slots").allowed  # /prefix/* is what is under it, not itself
    assert routes.check("GET", b"/metrics").allowed and not routes.check("POST", b"/metrics").allowed
    assert routes.check("PUT", b"/completion").allowed
    assert Routes(("/*",)).check("DELETE", b"/anything/at/all").allowed


@pytest.mark.parametrize("entry", ["slots", "/slots/../x", "/a//b", "/a/", "/%73lots", "get /x", "/a/*/b", ""])
def test_bad_allow_paths_are_config_errors(entry: str) -> None:
    with pytest.raises(ConfigError, match="allow_paths"):
        parse_allow((entry,))


def engine_view(raw: bytes) -> str:
    """What an engine routes on: the path decoded once, dot segments resolved."""
    text = unquote_to_bytes(raw).decode("utf-8", "replace")
    return posixpath.normpath("/" + text.lstrip("/")) if text else "/"


ALLOWED = {pattern for _, pattern in DEFAULT_ROUTES}
SEGMENTS = st.sampled_from(["v1", "chat", "completions", "models", "slots", "0", "..", ".", "", "%2e%2e", "%2F",
                            "%73lots", "health", "embeddings", "%252e", "pause", "x;y", "%00", "\\"])


def spellings(text: str) -> st.SearchStrategy[bytes]:
    """``text`` with any of its characters percent-encoded."""
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda flags: "".join(quote(c, safe="") if f and c != "/" else c for c, f in zip(text, flags, strict=True)).encode())


@settings(max_examples=400, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
       raw=st.one_of(st.lists(SEGMENTS, max_size=8).map(lambda s: ("/" + "/".join(s)).encode()),
                     st.binary(max_size=64).map(lambda b: b"/" + b),
                     st.sampled_from(["/slots/0", "/v1/chat/completions", "/pause", "/v1/models"]).flatmap(spellings)))
def test_whatever_the_spelling_the_engine_sees_only_an_allowed_path(method: str, raw: bytes) -> None:
    verdict = check(method, raw)
    if verdict.allowed:
        seen = engine_view(verdict.raw_path)
        assert seen == verdict.path
        assert seen in ALLOWED or any(seen.startswith(p[:-1]) for p in ALLOWED if p.endswith("/*"))
        assert not seen.startswith(("/slots", "/pause"))
    else:
        assert verdict.reason.startswith("forbidden by the gate")
