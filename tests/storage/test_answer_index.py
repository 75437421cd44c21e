"""The answer index against moto S3 and a file:// store: found by answer id and by request fingerprint,
authenticated, encrypted with the snapshot key, owner-only on disk, and every object read back as hostile."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from spotguard.errors import StoreError
from spotguard.gate.cursor import CursorKey, new_answer_id, request_fingerprint
from spotguard.metrics import Metrics
from spotguard.storage import crypto
from spotguard.storage.answer_index import (
    MAGIC,
    AnswerIndex,
    IndexEntry,
    KeptIdentity,
    entry_name,
    pointer_name,
)
from spotguard.storage.reader import list_snapshots
from spotguard.storage.store import Store, StoreOptions, open_store
from tests.storage.conftest import StallWhen

pytestmark = pytest.mark.anyio

RESUME_KEY = CursorKey.from_bytes(os.urandom(32))
SNAPSHOT_KEY = crypto.Key(os.urandom(32))
PROMPT = "what is the capital of France? (private prompt)"
BODY = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}).encode()
AUTH = "Bearer sk-alice"


def entry(*, now: float | None = None, answer_id: str | None = None, body: bytes = BODY) -> IndexEntry:
    now = time.time() if now is None else now
    return IndexEntry(answer_id=answer_id or new_answer_id(), fingerprint=request_fingerprint(RESUME_KEY, AUTH, body),
                      holder="http://10.0.0.5:8001", endpoint="/v1/chat/completions", model="m", stream=True,
                      body=body, output="The capital of France is", delivered=6,
                      identity=KeptIdentity(id="chatcmpl-9", created=1700000000, model="m",
                                            object="chat.completion.chunk", role_sent=True),
                      created=now, expires=now + 600)


def index(store: Store, *, sealed: bool = False, key: CursorKey = RESUME_KEY,
          metrics: Metrics | None = None) -> AnswerIndex:
    return AnswerIndex(store, index_key=key.index_key, seal_key=SNAPSHOT_KEY if sealed else None, metrics=metrics)


def soon(seconds: float = 10.0) -> float:
    return anyio.current_time() + seconds


async def _round_trip(answers: AnswerIndex) -> None:
    written = entry()
    await answers.write(written, deadline=soon())
    now = time.time()
    assert await answers.find(written.answer_id, written.fingerprint, now=now, deadline=soon()) == written
    assert await answers.find_by_fingerprint(written.fingerprint, now=now, deadline=soon()) == written
    # With another Authorization (so another fingerprint) there is nothing, even knowing the answer id.
    stranger = request_fingerprint(RESUME_KEY, "Bearer sk-mallory", BODY)
    assert await answers.find(written.answer_id, stranger, now=now, deadline=soon()) is None
    assert await answers.find_by_fingerprint(stranger, now=now, deadline=soon()) is None
    assert await answers.find(new_answer_id(), written.fingerprint, now=now, deadline=soon()) is None
    # Expired: None, by either way in.
    later = written.expires + 1
    assert await answers.find(written.answer_id, written.fingerprint, now=later, deadline=soon()) is None
    assert await answers.find_by_fingerprint(written.fingerprint, now=later, deadline=soon()) is None
    await answers.forget(written.answer_id, written.fingerprint, deadline=soon())
    assert await answers.find_by_fingerprint(written.fingerprint, now=now, deadline=soon()) is None


@pytest.mark.parametrize("sealed", [False, True])
async def test_round_trip_on_moto_s3(moto_url: str, bucket: str, sealed: bool) -> None:
    store = open_store(f"s3://{bucket}/spotguard", StoreOptions(endpoint_url=moto_url))
    with anyio.fail_after(30):
        await _round_trip(index(store, sealed=sealed))


@pytest.mark.parametrize("sealed", [False, True])
async def test_round_trip_on_a_file_store(tmp_path: Path, sealed: bool) -> None:
    with anyio.fail_after(30):
        await _round_trip(index(open_store(f"file://{tmp_path}/store"), sealed=sealed))


async def test_file_store_objects_are_owner_only_and_not_listed_as_snapshots(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    written = entry()
    with anyio.fail_after(30):
        await index(store).write(written, deadline=soon())
        assert await list_snapshots(store.url) == []
    folder = tmp_path / "store" / "_answers"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == sorted([f"a-{written.answer_id}.json", f"f-{written.fingerprint}.json"])
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert not any(f.name.endswith(".part") for f in folder.iterdir())


async def test_sealed_objects_hold_no_plain_text_and_need_the_key(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    written = entry()
    with anyio.fail_after(30):
        await index(store, sealed=True).write(written, deadline=soon())
        stored = (tmp_path / "store" / entry_name(written.answer_id)).read_bytes()
        assert PROMPT.encode() not in stored and b"capital" not in stored
        with pytest.raises(StoreError, match="encrypted"):
            await index(store).find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())
        # And a reader with the key refuses a plain object (an attacker cannot downgrade one).
        await index(store).write(written, deadline=soon())
        with pytest.raises(StoreError, match="not encrypted"):
            await index(store, sealed=True).find(written.answer_id, written.fingerprint, now=time.time(),
                                                 deadline=soon())


async def _planted(tmp_path: Path, name: str, data: bytes) -> AnswerIndex:
    path = tmp_path / "store" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return index(open_store(f"file://{tmp_path}/store"))


def _signed(name: str, payload: bytes) -> bytes:
    answers = index(open_store("file:///tmp"))
    return MAGIC + answers._mac(name, payload) + payload


async def test_an_object_altered_renamed_or_from_another_fleet_is_refused(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    written, other = entry(), entry()
    with anyio.fail_after(30):
        await index(store).write(written, deadline=soon())
        await index(store).write(other, deadline=soon())
        name = tmp_path / "store" / entry_name(written.answer_id)
        original = name.read_bytes()
        name.write_bytes(original.replace(b"The capital of France is", b"The capital of France is NOT"))
        with pytest.raises(StoreError, match="authentication failed"):
            await index(store).find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())
        # another answer's object copied under this name (a valid MAC for the other name)
        name.write_bytes((tmp_path / "store" / entry_name(other.answer_id)).read_bytes())
        with pytest.raises(StoreError, match="authentication failed"):
            await index(store).find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())
        name.write_bytes(original)
        foreign = index(store, key=CursorKey.from_bytes(os.urandom(32)))
        with pytest.raises(StoreError, match="authentication failed"):
            await foreign.find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "something-else"}, "not a spotguard-answer entry"),
    ({"endpoint": "/slots"}, "endpoint"),
    ({"holder": "http://evil/../x"}, "holder"),
    ({"holder": "file:///etc/passwd"}, "holder"),
    ({"delivered": -1}, "delivered"),
    ({"delivered": True}, "delivered"),
    ({"body_encoding": "rot13"}, "body_encoding"),
    ({"body": "%%%", "body_encoding": "base64"}, "base64"),
    ({"identity": []}, "identity"),
    ({"identity": {"created": "yesterday", "role_sent": True}}, "identity.created"),
    ({"expires": "never"}, "expires"),
    ({"output": 42}, "output"),
])
async def test_hostile_shapes_are_refused_with_the_field_named(tmp_path: Path, change: dict[str, object],
                                                               message: str) -> None:
    written = entry()
    name = entry_name(written.answer_id)
    payload = json.dumps({**written.to_json(), **change}).encode()
    answers = await _planted(tmp_path, name, _signed(name, payload))
    with anyio.fail_after(30), pytest.raises(StoreError, match=message):
        await answers.find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())


async def test_oversized_and_garbage_objects_are_refused_unread(tmp_path: Path) -> None:
    written = entry()
    name = entry_name(written.answer_id)
    with anyio.fail_after(30):
        answers = await _planted(tmp_path, name, b"x" * (33 << 20))
        with pytest.raises(StoreError, match="larger than"):
            await answers.find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())
        answers = await _planted(tmp_path, name, b"not ours")
        with pytest.raises(StoreError, match="not a spotguard answer index object"):
            await answers.find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())
        pointer = pointer_name(written.fingerprint)
        answers = await _planted(tmp_path, pointer, _signed(pointer, b'{"answer_id":"../../etc/passwd"}'))
        with pytest.raises(StoreError, match="pointer"):
            await answers.find_by_fingerprint(written.fingerprint, now=time.time(), deadline=soon())


async def test_a_body_that_is_not_utf8_round_trips(tmp_path: Path) -> None:
    written = entry(body=b"\xff\xfe binary \x00 body")
    answers = index(open_store(f"file://{tmp_path}/store"))
    with anyio.fail_after(30):
        await answers.write(written, deadline=soon())
        found = await answers.find(written.answer_id, written.fingerprint, now=time.time(), deadline=soon())
    assert found is not None and found.body == written.body


async def test_a_stalled_store_ends_at_the_deadline(moto_url: str, bucket: str,
                                                    stalling_proxy: Callable[[StallWhen], str]) -> None:
    proxy = await stalling_proxy(lambda path: "/_answers/" in path)
    metrics = Metrics()
    answers = index(open_store(f"s3://{bucket}/spotguard", StoreOptions(endpoint_url=proxy)), metrics=metrics)
    written = entry()
    started = anyio.current_time()
    with anyio.fail_after(10):
        with pytest.raises(StoreError, match="deadline"):
            await answers.write(written, deadline=soon(0.5))
        with pytest.raises(StoreError, match="deadline"):
            await answers.find_by_fingerprint(written.fingerprint, now=time.time(), deadline=soon(0.5))
    assert anyio.current_time() - started < 5.0  # two 0.5 s deadlines, generously
    rendered = metrics.render().decode()
    assert 'spotguard_resume_index_total{op="write",result="timeout"} 1.0' in rendered
    assert 'spotguard_resume_index_total{op="lookup",result="timeout"} 1.0' in rendered


async def test_the_newest_answer_to_a_request_wins_and_forgetting_an_older_one_keeps_its_pointer(
        tmp_path: Path) -> None:
    answers = index(open_store(f"file://{tmp_path}/store"))
    older, newer = entry(), entry()
    with anyio.fail_after(30):
        await answers.write(older, deadline=soon())
        await answers.write(newer, deadline=soon())
        assert await answers.find_by_fingerprint(newer.fingerprint, now=time.time(), deadline=soon()) == newer
        await answers.forget(older.answer_id, older.fingerprint, deadline=soon())
        assert await answers.find_by_fingerprint(newer.fingerprint, now=time.time(), deadline=soon()) == newer
        assert await answers.find(older.answer_id, older.fingerprint, now=time.time(), deadline=soon()) is None
