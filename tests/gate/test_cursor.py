"""Resume cursors: useless with another Authorization, another request, another key, after the ttl, or altered."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotguard.config import load
from spotguard.errors import ConfigError, ResumeRefused
from spotguard.gate.cursor import (
    AnswerCursors,
    CursorKey,
    advertised_holder,
    new_answer_id,
    request_fingerprint,
)
from spotguard.resume_names import holder_problem

KEY = CursorKey.from_bytes(bytes(range(32)))
OTHER_KEY = CursorKey.from_bytes(bytes(32))
AUTH = b"Bearer sk-alice"
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hello"}]}'
HOLDER = "http://10.0.0.5:8001"
NOW = 1_800_000_000.0


def signed_cursor(offset: int = 7, *, expires: float = NOW + 600) -> str:
    fingerprint = request_fingerprint(KEY, AUTH, BODY)
    return KEY.issue(HOLDER, "AbCdEfGh12345678", fingerprint=fingerprint, expires=expires).at(offset)


def test_a_cursor_round_trips_and_fits_an_sse_id_line() -> None:
    cursor = signed_cursor()
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[0-9]+", cursor)  # no NUL, CR, LF, space, comma or colon
    assert len(cursor) <= 100
    found = KEY.verify(cursor, fingerprint=request_fingerprint(KEY, AUTH, BODY), now=NOW)
    assert (found.holder, found.answer_id, found.offset) == (HOLDER, "AbCdEfGh12345678", 7)


@pytest.mark.parametrize(("key", "auth", "body", "now", "reason"), [
    (KEY, b"Bearer sk-mallory", BODY, NOW, "mismatch"),
    (KEY, None, BODY, NOW, "mismatch"),
    (KEY, AUTH, BODY.replace(b"hello", b"hellp"), NOW, "mismatch"),
    (OTHER_KEY, AUTH, BODY, NOW, "mismatch"),
    (KEY, AUTH, BODY, NOW + 600, "expired"),
])
def test_a_cursor_is_refused_for_another_request_key_or_after_its_ttl(
        key: CursorKey, auth: bytes | None, body: bytes, now: float, reason: str) -> None:
    cursor = signed_cursor()
    with pytest.raises(ResumeRefused) as refused:
        key.verify(cursor, fingerprint=request_fingerprint(key, auth, body), now=now)
    assert refused.value.reason == reason
    assert cursor.split(".")[0] not in str(refused.value)  # never the cursor in a message (logs)


@given(position=st.integers(min_value=0), char=st.sampled_from("AQgwxyz09-_"))
def test_any_change_to_the_signed_part_is_refused(position: int, char: str) -> None:
    cursor = signed_cursor()
    token, offset = cursor.split(".")
    position %= len(token)
    altered = token[:position] + char + token[position + 1:]
    if altered == token:
        return
    with pytest.raises(ResumeRefused):
        KEY.verify(altered + "." + offset, fingerprint=request_fingerprint(KEY, AUTH, BODY), now=NOW)


def test_a_token_whose_last_character_differs_only_in_unused_bits_is_refused() -> None:
    token, offset = signed_cursor().split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 58 signed bytes: the last character carries 2 bits; +1 changes only the unused ones.
    sibling = token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]
    with pytest.raises(ResumeRefused):
        KEY.verify(sibling + "." + offset, fingerprint=request_fingerprint(KEY, AUTH, BODY), now=NOW)


def test_the_offset_is_not_signed_but_only_moves_within_the_same_answer() -> None:
    token = signed_cursor().split(".")[0]
    found = KEY.verify(token + ".0", fingerprint=request_fingerprint(KEY, AUTH, BODY), now=NOW)
    assert (found.answer_id, found.offset) == ("AbCdEfGh12345678", 0)


@pytest.mark.parametrize("garbage", ["", ".", "abc", "abc.", "abc.-1", "abc.1e3", "a b.1", "abc.\u0661",
                                     "!!!.1", "A" * 600 + ".1", "AAAA.1", "abc.1\n"])
def test_garbage_is_malformed(garbage: str) -> None:
    with pytest.raises(ResumeRefused) as refused:
        KEY.verify(garbage, fingerprint=request_fingerprint(KEY, AUTH, BODY), now=NOW)
    assert refused.value.reason in ("malformed", "mismatch")


def test_fingerprints_depend_on_authorization_and_body_and_reveal_neither() -> None:
    base = request_fingerprint(KEY, AUTH, BODY)
    assert re.fullmatch(r"[0-9a-f]{32}", base)
    assert base == request_fingerprint(KEY, AUTH.decode(), BODY)  # header as str or bytes
    others = {request_fingerprint(KEY, b"Bearer sk-bob", BODY), request_fingerprint(KEY, None, BODY),
              request_fingerprint(KEY, AUTH, BODY + b" "), request_fingerprint(OTHER_KEY, AUTH, BODY),
              request_fingerprint(KEY, AUTH[:-1], AUTH[-1:] + BODY)}  # the boundary is part of it
    assert base not in others and len(others) == 5


def test_answer_cursors_are_signed_once_and_renewed_so_each_lasts_the_ttl() -> None:
    fingerprint = request_fingerprint(KEY, AUTH, BODY)
    cursors = AnswerCursors(KEY, HOLDER, new_answer_id(), fingerprint=fingerprint, ttl=600.0, now=NOW)
    first = cursors.at(1, NOW)
    assert cursors.at(2, NOW + 30) == first[:-1] + "2"  # same signed part: one concatenation per event
    for elapsed in (0.0, 59.0, 61.0, 300.0, 1000.0):
        cursor = cursors.at(9, NOW + elapsed)
        assert KEY.verify(cursor, fingerprint=fingerprint, now=NOW + elapsed + 599.0).offset == 9
    assert cursors.signed.prefix != first[:-1]


def test_answer_ids_are_unique_and_url_safe() -> None:
    ids = {new_answer_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[A-Za-z0-9_-]{16}", i) for i in ids)


@pytest.mark.parametrize(("url", "ok"), [
    ("http://10.0.0.5:8001", True), ("https://gate.internal", True), ("http://[fd00::5]:8001/", True),
    ("ftp://10.0.0.5", False), ("http://", False), ("http://u:p@10.0.0.5:8001", False),
    ("http://10.0.0.5:8001/v1", False), ("http://10.0.0.5:99999", False), ("http://10.0.0.5:8001?x=1", False),
    ("http://bad host", False), ("http://\u00e9.example", False),
])
def test_holder_urls(url: str, ok: bool) -> None:
    assert (holder_problem(url) == "") is ok


@pytest.mark.parametrize(("advertise", "listen", "private_ip", "expected"), [
    ("http://gate-3.internal:8001/", "0.0.0.0:8001", "10.0.0.5", "http://gate-3.internal:8001"),
    ("", "0.0.0.0:8001", "10.0.0.5", "http://10.0.0.5:8001"),
    ("", "[::]:8001", "fd00::5", "http://[fd00::5]:8001"),
    ("", "10.0.0.7:8001", "10.0.0.5", "http://10.0.0.7:8001"),  # bound to one address: reachable only there
    ("", "0.0.0.0:8001", "", ""),
    ("", "", "10.0.0.5", ""),
])
def test_the_advertised_holder(advertise: str, listen: str, private_ip: str, expected: str) -> None:
    assert advertised_holder(advertise, listen, private_ip) == expected


def test_key_files(tmp_path: Path) -> None:
    raw = os.urandom(32)
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "hex").write_text(raw.hex() + "\n")
    assert CursorKey.load(str(tmp_path / "raw")).key_id == CursorKey.load(str(tmp_path / "hex")).key_id
    (tmp_path / "short").write_bytes(b"x" * 31)
    with pytest.raises(ConfigError, match=r"\[resume\] key_file .*32 raw bytes"):
        CursorKey.load(str(tmp_path / "short"))
    with pytest.raises(ConfigError, match=r"\[resume\] key_file .*cannot be read"):
        CursorKey.load(str(tmp_path / "missing"))
    assert raw.hex() not in repr(CursorKey.load(str(tmp_path / "raw")))


@pytest.mark.parametrize(("values", "message"), [
    ({"ttl": 0}, r"\[resume\] ttl"),
    ({"max_bytes": 1000}, r"\[resume\] max_bytes"),
    ({"max_answer_bytes": 0}, r"\[resume\] max_answer_bytes"),
    ({"lookup_timeout": 0}, r"\[resume\] lookup_timeout"),
    ({"advertise": "10.0.0.5:8001"}, r"\[resume\] advertise: '10.0.0.5:8001' must be http"),
])
def test_resume_settings_that_cannot_work_name_their_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, environ={}, overrides={"resume": values})


def test_resume_settings_from_the_environment() -> None:
    config = load(None, environ={"SPOTGUARD_RESUME_KEY_FILE": "/etc/spotguard/resume.key",
                                 "SPOTGUARD_RESUME_TTL": "120", "SPOTGUARD_RESUME_INDEX": "false"})
    assert (config.resume.key_file, config.resume.ttl, config.resume.index) == ("/etc/spotguard/resume.key", 120.0,
                                                                              False)
