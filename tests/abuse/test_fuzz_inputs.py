"""Hostile bytes into every parser that reads what others wrote: manifests, records, object names, sealed
objects, SSE from the engine, request bodies. Each either accepts the input or refuses it with a clear
``StoreError``; none crashes, none accepts something it should not."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spotguard.errors import StoreError
from spotguard.gate.output import OutputParser, request_meta
from spotguard.storage import crypto
from spotguard.storage.format import (
    RECORD_ENDPOINTS,
    BadRecord,
    ContinuationRecord,
    Manifest,
    parse_manifest,
    parse_records,
)
from spotguard.storage.names import SafeFile, check_name, problem
from tests.storage.hostile import entry, manifest, record

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
KEY = crypto.Key(bytes(range(32)))


def valid_manifest() -> dict[str, Any]:
    return manifest([entry("records/000000.jsonl", "records", b"x\n"),
                     entry("kv/slot-0.bin", "kv", b"kv", slot_id=0, tokens=3, request_ids=["r1"])])


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(valid_manifest()) + ["objects.0.name", "objects.0.size", "objects.1.kind",
                                                        "objects.0.request_ids", "objects.0.sha256", "engine"]),
       value=JSON)
def test_a_manifest_with_any_field_replaced_parses_or_is_refused(field: str, value: Any) -> None:
    doc = valid_manifest()
    if field.startswith("objects."):
        _, index, name = field.split(".")
        doc["objects"][int(index)][name] = value
    else:
        doc[field] = value
    try:
        raw = json.dumps(doc).encode()
    except ValueError:
        return
    try:
        parsed, trust = parse_manifest(raw, None)
    except StoreError:
        return
    assert not trust.authenticated
    for item in parsed.objects:
        assert problem(item.name) == ""  # an accepted manifest names only objects inside the snapshot


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=2048) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_manifest_are_parsed_or_refused(raw: bytes) -> None:
    for key in (None, KEY):
        try:
            parse_manifest(raw, key)
        except StoreError:
            pass


@settings(max_examples=200, deadline=None)
@given(flip=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_a_signed_manifest_with_any_bit_flipped_does_not_verify(flip: int, bit: int) -> None:
    raw = bytearray(Manifest.from_json(json.dumps(valid_manifest()).encode()).to_json(KEY))
    index = flip % len(raw)
    raw[index] ^= 1 << bit
    try:
        parsed, trust = parse_manifest(bytes(raw), KEY)
    except StoreError:
        return
    if not trust.authenticated:
        return  # the MAC itself was damaged away: open_snapshot with a key refuses such a manifest
    # Only a change JSON does not see (whitespace, or escaping that decodes the same) may still verify.
    assert parsed == Manifest.from_json(Manifest.from_json(
        json.dumps(valid_manifest()).encode()).to_json(KEY))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400) | st.lists(JSON, max_size=5).map(lambda v: "\n".join(json.dumps(x) for x in v)),
       endpoint=st.text(max_size=40))
def test_records_are_parsed_or_reported_never_raised(text: str, endpoint: str) -> None:
    lines = text + "\n" + json.dumps(record("r-1", endpoint=endpoint))
    found = parse_records(lines)
    assert found, "every non-empty line gives a record or a bad record"
    for item in found:
        if isinstance(item, ContinuationRecord):
            assert item.endpoint in RECORD_ENDPOINTS
        else:
            assert isinstance(item, BadRecord) and item.error


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=60) | st.sampled_from(["records/000000.jsonl", "kv/slot-1.bin", "../x", "/etc/x"]))
def test_an_accepted_object_name_stays_inside_the_destination(name: str, tmp_path: Path) -> None:
    try:
        check_name(name)
    except StoreError as exc:
        assert "\x1b" not in str(exc) and "\x00" not in str(exc)
        return
    root = tmp_path / "root"
    target = SafeFile(root, name)
    target.write(b"x")
    written = target.commit()
    assert written.resolve().is_relative_to(root.resolve())


@settings(max_examples=200, deadline=None)
@given(plain=st.binary(max_size=5000), cut=st.integers(min_value=0), flip=st.integers(min_value=0),
       chunk=st.integers(min_value=1, max_value=700))
def test_sealed_objects_refuse_truncation_and_tampering(plain: bytes, cut: int, flip: int, chunk: int) -> None:
    bound = crypto.binding("i", "e", "kv/slot-0.bin")
    sealer = crypto.Sealer(KEY, bound, frame_bytes=512)  # small frames: many frame boundaries
    frames = [plain[i:i + 512] for i in range(0, len(plain), 512)] or [b""]
    stored = sealer.header + b"".join(sealer.seal(f, last=i == len(frames) - 1) for i, f in enumerate(frames))

    def open_all(data: bytes) -> bytes:
        opener = crypto.Opener(KEY, bound, "kv/slot-0.bin")
        out = b"".join(opener.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
        return out + opener.finish()

    assert open_all(stored) == plain
    shorter = stored[:cut % len(stored)]
    with pytest.raises(StoreError):
        open_all(shorter)
    tampered = bytearray(stored)
    tampered[flip % len(stored)] ^= 0x01
    with pytest.raises(StoreError):
        open_all(bytes(tampered))


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300) | st.sampled_from(
    [b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n", b"data: [DONE]\n\n", b"data: {\n", b"\r\n",
     b"data: {\"choices\": 5}\n\n", b"data: " + b"9" * 5000 + b"\n\n", b"event: x\ndata: null\n\n"]), max_size=20),
       chat=st.booleans())
def test_malformed_upstream_sse_is_counted_never_raised(chunks: list[bytes], chat: bool) -> None:
    parser = OutputParser(chat=chat)
    for chunk in chunks:
        parser.feed(chunk)
    parser.finish()
    parser.parse_body(b"".join(chunks))
    assert parser.errors >= 0 and isinstance(parser.text, str)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_request_body_gives_meta_or_none(body: bytes) -> None:
    meta = request_meta(body)
    assert meta is None or (isinstance(meta[0], str) and isinstance(meta[1], bool))


@pytest.mark.parametrize("header", [
    crypto.MAGIC + (1 << 31).to_bytes(4, "big") + os.urandom(crypto.SALT_BYTES),
    crypto.MAGIC_V2 + (1 << 31).to_bytes(4, "big") + os.urandom(crypto.PREFIX_BYTES),
], ids=["v3", "v2"])
def test_a_huge_frame_size_in_a_header_is_refused_before_buffering(header: bytes) -> None:
    opener = crypto.Opener(KEY, b"", "kv/slot-0.bin")
    with pytest.raises(StoreError, match="frame size"):
        opener.feed(header)


@given(st.data())
@settings(max_examples=50, deadline=None)
def test_objects_are_bound_to_instance_event_and_name(data: st.DataObject) -> None:
    parts = data.draw(st.tuples(st.text(max_size=10), st.text(max_size=10), st.text(max_size=10)))
    other = data.draw(st.tuples(st.text(max_size=10), st.text(max_size=10), st.text(max_size=10)))
    assume(parts != other)
    sealed = crypto.seal(KEY, crypto.binding(*parts), b"payload")
    with pytest.raises(StoreError, match="authentication failed"):
        crypto.open_sealed(KEY, crypto.binding(*other), "x", sealed)
