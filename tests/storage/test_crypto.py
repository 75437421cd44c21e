"""Snapshot object encryption: a key per object (format version 3), and objects written by earlier versions
still open. The version 2 fixtures in data/ were written by the code before the per-object key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotguard.errors import StoreError
from spotguard.storage import crypto

DATA = Path(__file__).parent / "data"
FIXTURE_KEY = crypto.Key(bytes(range(32)))
FIXTURE_BINDING = crypto.binding("i-0fixture", "event-fixture", "records/000000.jsonl")
FIXTURE_PLAIN = b'{"id":"r1","body":"spotguard format v2 fixture"}\n' * 5


def opened_in_pieces(key: crypto.Key, bound: bytes, stored: bytes, piece: int) -> bytes:
    opener = crypto.Opener(key, bound, "records/000000.jsonl")
    out = [opener.feed(stored[i:i + piece]) for i in range(0, len(stored), piece)]
    return b"".join(out) + opener.finish()


@pytest.mark.parametrize("piece", [1, 7, 64, 1 << 20])
def test_version_2_objects_written_before_still_open(piece: int) -> None:
    framed = (DATA / "sge2-framed.bin").read_bytes()
    assert framed.startswith(crypto.MAGIC_V2)
    assert opened_in_pieces(FIXTURE_KEY, FIXTURE_BINDING, framed, piece) == FIXTURE_PLAIN
    whole = (DATA / "sge2-whole.bin").read_bytes()
    assert opened_in_pieces(FIXTURE_KEY, FIXTURE_BINDING, whole, piece) == b"small record\n"


def test_an_altered_version_2_object_fails_authentication() -> None:
    framed = bytearray((DATA / "sge2-framed.bin").read_bytes())
    framed[crypto.HEADER_BYTES_V2 + 3] ^= 1
    with pytest.raises(StoreError, match="authentication failed"):
        crypto.open_sealed(FIXTURE_KEY, FIXTURE_BINDING, "r", bytes(framed))


def _keystream(stored: bytes, plain: bytes) -> bytes:
    ciphertext = stored[crypto.HEADER_BYTES:crypto.HEADER_BYTES + len(plain)]
    return bytes(a ^ b for a, b in zip(ciphertext, plain, strict=True))


def test_new_objects_are_version_3_with_a_key_of_their_own() -> None:
    """Every object's nonces are the same (frame index + flag), and its key is derived from a 32-byte random
    salt: two objects never share a keystream, however many the fleet writes (version 2's 7-byte random
    nonce prefix under one fleet-wide key collided with odds n^2/2^57 and then reused GCM nonces)."""
    key = crypto.Key(os.urandom(32))
    bound = crypto.binding("i-1", "evt-1", "records/000000.jsonl")
    plain = b"the same prompt, twice" * 10
    first, second = crypto.seal(key, bound, plain), crypto.seal(key, bound, plain)
    for stored in (first, second):
        assert stored.startswith(crypto.MAGIC) and crypto.MAGIC == b"SGE3"
        assert len(stored) == crypto.HEADER_BYTES + len(plain) + crypto.TAG_BYTES
        assert crypto.open_sealed(key, bound, "r", stored) == plain
    assert first[8:crypto.HEADER_BYTES] != second[8:crypto.HEADER_BYTES]  # the salts
    assert _keystream(first, plain) != _keystream(second, plain)
    assert key.key_for_object(first[8:crypto.HEADER_BYTES]) != key.key_for_object(second[8:crypto.HEADER_BYTES])


@pytest.mark.parametrize("size", [0, 1, 100, 64, 65, 64 * 3])
def test_version_3_frames_round_trip_and_refuse_reordering_and_truncation(size: int) -> None:
    key = crypto.Key(os.urandom(32))
    bound = crypto.binding("i-1", "evt-1", "kv/slot-0.bin")
    plain = os.urandom(size)
    sealer = crypto.Sealer(key, bound, frame_bytes=64)
    frames = [plain[i:i + 64] for i in range(0, len(plain), 64)] or [b""]
    sealed = [sealer.seal(frame, last=i == len(frames) - 1) for i, frame in enumerate(frames)]
    stored = sealer.header + b"".join(sealed)
    assert opened_in_pieces(key, bound, stored, 5) == plain
    if len(sealed) > 1:
        with pytest.raises(StoreError, match="authentication failed"):
            crypto.open_sealed(key, bound, "r", sealer.header + b"".join(reversed(sealed)))
        with pytest.raises(StoreError, match="authentication failed"):
            crypto.open_sealed(key, bound, "r", sealer.header + b"".join(sealed[:-1]))
    with pytest.raises(StoreError, match="authentication failed"):
        crypto.open_sealed(crypto.Key(os.urandom(32)), bound, "r", stored)


def test_a_header_of_another_kind_is_refused() -> None:
    with pytest.raises(StoreError, match="not a spotguard-encrypted object"):
        crypto.Opener(FIXTURE_KEY, b"", "x").feed(b"SGE9" + bytes(40))
    with pytest.raises(StoreError, match="too short"):
        crypto.Opener(FIXTURE_KEY, b"", "x").finish()
