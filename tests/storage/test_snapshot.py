"""The snapshot step against real stores over loopback: moto S3, Azurite, local files, and faulty stores."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import boto3
import httpx
import pytest

from spotguard.config import Config
from spotguard.drain.snapshot import Snapshot
from spotguard.drain.step import StepResult
from spotguard.errors import ConfigError, GateError, StoreError
from spotguard.gate.journal import EntryJournal
from spotguard.gate.protocol import JournalEntry
from spotguard.servers.llamacpp import SavedSlot
from spotguard.storage import crypto
from spotguard.storage.format import Entry, Manifest
from spotguard.storage.kv import order_by_value
from spotguard.storage.reader import IncompleteSnapshot, list_snapshots, open_snapshot
from spotguard.storage.snapshot import prepare
from spotguard.storage.store import MissingObject, StoreOptions, open_store
from spotguard.storage.upload import put_file
from tests.storage.conftest import StallWhen, fill_journal, make_ctx, take_snapshot
from tests.support.azurite import create_container
from tests.support.gate import StartGate
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio


def s3_config(bucket: str, endpoint: str, **snapshot: object) -> Config:
    return Config().replace("snapshot", url=f"s3://{bucket}/spotguard", endpoint_url=endpoint, **snapshot)


async def test_records_for_1000_requests_all_commit(moto_url: str, bucket: str) -> None:
    # How fast (the <= 1 s target) is bench/snapshot.py's figure, measured against a baseline.
    config = s3_config(bucket, moto_url)
    journal = fill_journal(1000)
    snapshotter = await prepare(config)
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(30):
            detail = await take_snapshot(make_ctx(config, http, journal), snapshotter)
            snap = await open_snapshot(f"s3://{bucket}/spotguard/i-test/evt-1", StoreOptions(endpoint_url=moto_url))
            records = await snap.records()
            problems = await snap.verify()
    assert "1000/1000 records" in detail
    assert snap.manifest.complete and snap.manifest.requests == 1000 and not snap.manifest.missing
    assert problems == []
    by_id = {r.id: r for r in records}
    assert len(by_id) == 1000
    for request in list(journal):
        record = by_id[request.id]
        assert record.body_bytes() == request.body  # the original body, unchanged
        assert record.output == request.output
        assert (record.endpoint, record.model, record.stream) == (request.endpoint, request.model, True)


async def test_body_that_is_not_utf8_is_kept_byte_for_byte(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps")
    journal = EntryJournal()
    raw = b"\xff\xfe{not utf-8}\x00"
    journal.add(JournalEntry(id="r1", endpoint="/v1/completions", model="m", body=raw, stream=False))
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await take_snapshot(make_ctx(config, http, journal, event_id="evt/../2"))
            summaries = await list_snapshots(f"file://{tmp_path}/snaps")
            assert [(s.instance_id, s.event_id, s.has_manifest) for s in summaries] == [("i-test", "evt_.._2", True)]
            (record,) = await (await open_snapshot(summaries[0].url)).records()
    assert record.body_encoding == "base64" and record.body_bytes() == raw


async def test_encryption_round_trip(moto_url: str, bucket: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    config = s3_config(bucket, moto_url, encryption_key_file=str(key_file))
    journal = fill_journal(3)
    bodies = [r.body for r in journal]  # the journal forgets them once their records are stored
    secret = json.loads(bodies[0])["messages"][0]["content"]
    url = f"s3://{bucket}/spotguard/i-test/evt-1"
    options = StoreOptions(endpoint_url=moto_url)
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(30):
            await take_snapshot(make_ctx(config, http, journal))
            stored = await open_store(url, options).get("records/000000.jsonl")
            plain = await open_snapshot(url, options)
            with pytest.raises(StoreError, match="encrypted"):
                await plain.records()
            with pytest.raises(StoreError, match="authenticated with key"):
                await open_snapshot(url, options, key=crypto.Key(os.urandom(32)))
            right = await open_snapshot(url, options, key=crypto.load_key(str(key_file)))
            records = await right.records()
    assert secret.encode() not in stored and stored.startswith(crypto.MAGIC)
    assert right.manifest.encryption["algorithm"] == "AES-256-GCM"
    assert right.trust.authenticated and right.manifest.version == 2
    assert all(e.encrypted for e in right.manifest.objects)
    assert [r.body_bytes() for r in records] == bodies and len(journal) == 0


def test_key_file_must_be_32_bytes_or_64_hex(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(b"k" * 32)
    assert crypto.load_key(str(raw)).raw == b"k" * 32
    for content in (b"short", b"z" * 64, b"k" * 33):
        bad = tmp_path / "bad"
        bad.write_bytes(content)
        with pytest.raises(ConfigError, match="encryption_key_file"):
            crypto.load_key(str(bad))
    with pytest.raises(ConfigError, match="cannot be read"):
        crypto.load_key(str(tmp_path / "absent"))


def test_swapped_ciphertext_fails_authentication() -> None:
    key = crypto.Key(os.urandom(32))
    sealed = crypto.seal(key, crypto.binding("i-1", "evt-1", "records/000000.jsonl"), b"data")
    assert crypto.open_sealed(key, crypto.binding("i-1", "evt-1", "records/000000.jsonl"), "r", sealed) == b"data"
    for other in (crypto.binding("i-1", "evt-1", "kv/slot-0.bin"), crypto.binding("i-1", "evt-2", "records/000000.jsonl"),
                  crypto.binding("i-2", "evt-1", "records/000000.jsonl")):
        with pytest.raises(StoreError, match="authentication failed"):
            crypto.open_sealed(key, other, "r", sealed)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again at once: nothing listens there


async def test_unreachable_store_ends_within_budget(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url="s3://bucket/x", endpoint_url=f"http://127.0.0.1:{_dead_port()}")
    config = config.replace("drain", snapshot_budget=3.0)
    async with httpx.AsyncClient() as http:
        # Ends on its own with a StoreError (a step that ignored its budget would meet the hang guard's
        # TimeoutError instead).
        with anyio.fail_after(10), pytest.raises(StoreError, match="incomplete") as caught:  # hang guard
            await take_snapshot(make_ctx(config, http, fill_journal(5)))
    assert "manifest" in str(caught.value) and "0/5 records" in str(caught.value)


async def test_stalled_store_manifest_says_what_is_missing(moto_url: str, bucket: str,
                                                           stalling_proxy: Callable[[StallWhen], str]) -> None:
    proxy = await stalling_proxy(lambda path: "/records/" in path)
    config = s3_config(bucket, proxy).replace("drain", snapshot_budget=3.0)
    async with httpx.AsyncClient() as http:
        # Cut by its own 3 s budget (the error says so); fail_after(10) only guards against a hang.
        with anyio.fail_after(10), pytest.raises(StoreError, match=r"snapshot budget of [0-9.]+s ran out"):
            await take_snapshot(make_ctx(config, http, fill_journal(4)))
        with anyio.fail_after(10):
            raw = await open_store(f"s3://{bucket}/spotguard/i-test/evt-1",
                                   StoreOptions(endpoint_url=moto_url)).get("manifest.json")
    manifest = Manifest.from_json(raw)
    assert not manifest.complete and manifest.objects == ()
    assert [m.reason for m in manifest.missing] == ["budget ran out"]
    assert "records of 4 requests" in manifest.missing[0].what


async def test_cancelled_upload_leaves_no_manifest(moto_url: str, bucket: str,
                                                   stalling_proxy: Callable[[StallWhen], str]) -> None:
    """Cut from outside mid-upload (no deadline it could see coming): no manifest may claim anything."""
    stalled: list[str] = []

    def stall(path: str) -> bool:
        if "/records/" in path:
            stalled.append(path)
            return True
        return False

    proxy = await stalling_proxy(stall)
    config = s3_config(bucket, proxy)
    async with httpx.AsyncClient() as http, anyio.create_task_group() as tg:
        async def snapshot() -> None:
            await take_snapshot(make_ctx(config, http, fill_journal(10)))

        tg.start_soon(snapshot)
        with anyio.fail_after(10):
            while not stalled:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    url = f"s3://{bucket}/spotguard/i-test/evt-1"
    with anyio.fail_after(10):
        with pytest.raises(MissingObject):
            await open_store(url, StoreOptions(endpoint_url=moto_url)).get("manifest.json")
        with pytest.raises(IncompleteSnapshot):
            await open_snapshot(url, StoreOptions(endpoint_url=moto_url))
        summaries = await list_snapshots(f"s3://{bucket}/spotguard", StoreOptions(endpoint_url=moto_url))
    assert all(not s.has_manifest for s in summaries)


@pytest.mark.azurite
async def test_azurite_snapshot(azurite_url: str) -> None:
    create_container(azurite_url, "drains")
    config = Config().replace("snapshot", url="az://drains/spotguard", endpoint_url=azurite_url)
    journal = fill_journal(50)
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(30):
            detail = await take_snapshot(make_ctx(config, http, journal))
            snap = await open_snapshot("az://drains/spotguard/i-test/evt-1", StoreOptions(endpoint_url=azurite_url))
            assert await snap.verify() == []
            assert len(await snap.records()) == 50
    assert "50/50 records" in detail


async def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/s")
    snapshotter = await prepare(config)
    async with httpx.AsyncClient() as http:
        ctx = make_ctx(config, http, fill_journal(2))
        ctx = dataclasses.replace(ctx, dry_run=True,
                                  services=dataclasses.replace(ctx.services, snapshot=snapshotter))
        with anyio.fail_after(5):
            result = await Snapshot().run(ctx)
            stored = await list_snapshots(f"file://{tmp_path}/s")
    assert isinstance(result, StepResult) and result.outcome == "dry_run"
    assert result.detail.startswith("would save the context of 2 in-flight requests")
    assert stored == []


def test_kv_files_go_up_most_valuable_per_byte_first() -> None:
    saved = [SavedSlot(0, "a", tokens=100, bytes=40_000), SavedSlot(1, "b", tokens=100, bytes=20_000),
             SavedSlot(2, "c", tokens=300, bytes=60_000), SavedSlot(3, "d", tokens=10, bytes=9_000)]
    assert [s.slot_id for s in order_by_value(saved)] == [1, 2, 0, 3]


@pytest.mark.parametrize("size", [0, 1, crypto.FRAME_BYTES, 3 * crypto.FRAME_BYTES + 5, 20 * 1024 * 1024])
async def test_kv_files_stream_up_sealed_and_come_back_whole(moto_url: str, bucket: str, tmp_path: Path,
                                                              size: int) -> None:
    """A slot file goes up in parts, sealed frame by frame; the reader streams it back to a file."""
    key = crypto.Key(os.urandom(32))
    source = tmp_path / "slot.bin"
    source.write_bytes(os.urandom(size))
    store = open_store(f"s3://{bucket}/spotguard", StoreOptions(endpoint_url=moto_url))
    name = "kv/slot-0.bin"
    with anyio.fail_after(60):
        stored_size, digest = await put_file(store, key, f"i-test/evt-1/{name}",
                                             crypto.binding("i-test", "evt-1", name), source)
        manifest = Manifest(instance_id="i-test", event_id="evt-1", source="manual", notice_kind="test",
                            created_at="", completed_at="", complete=True, requests=0,
                            objects=(Entry(name=name, kind="kv", size=stored_size, sha256=digest, encrypted=True),),
                            encryption=key.describe())
        await store.put("i-test/evt-1/manifest.json", manifest.to_json(key))
        snap = await open_snapshot(f"s3://{bucket}/spotguard/i-test/evt-1", StoreOptions(endpoint_url=moto_url),
                                   key=key)
        written = await snap.save(name, tmp_path / "back")
    assert written.read_bytes() == source.read_bytes()
    frames = max(1, -(-size // crypto.FRAME_BYTES))
    assert stored_size == crypto.HEADER_BYTES + size + frames * crypto.TAG_BYTES
    if size > 8 * 1024 * 1024:
        head = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").head_object(
            Bucket=bucket, Key=f"spotguard/i-test/evt-1/{name}")
        assert "-" in head["ETag"], "a big slot file goes up as a multipart upload"


async def test_a_recorded_request_is_cut_so_it_is_never_answered_twice(tmp_path: Path, fake_engine: FakeEngine,
                                                                      start_gate: StartGate) -> None:
    # No peers, an engine that is not llama.cpp: what still runs is cut before it is recorded. Were it left
    # running, its client would get the whole answer while `spotguard resume` computed it again.
    gw = await start_gate(fake_engine.url)
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps").replace("server", kind="vllm")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": 8, "x_hold_after": 3}).encode()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(20):
            async with client.stream("POST", "/v1/chat/completions", content=body) as response:
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: ") and fake_engine.holding:
                        break
                detail = await take_snapshot(make_ctx(config, client, gw.gate.journal))
                rest = [line async for line in lines if line.startswith("data: ")]
    assert "1/1 records" in detail
    assert json.loads(rest[-1][6:])["error"]["type"] == "interrupted_for_migration"  # cut, not finished here
    assert gw.entries() == []  # recorded, then forgotten by the gate
    fake_engine.release.set()


class GateGoneAtTheCut(EntryJournal):
    """A gate that counts its requests, then goes away when told to cut them (its control socket reset)."""

    async def interrupt_and_wait(self, timeout: float) -> list[JournalEntry]:
        raise GateError("gate control socket: connection reset by peer")


async def test_a_gate_lost_at_the_cut_fails_the_step_with_the_requests_it_lost(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps")
    journal = GateGoneAtTheCut(list(fill_journal(3)))
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10), pytest.raises(StoreError, match="incomplete") as caught:
            await take_snapshot(make_ctx(config, http, journal))
        with anyio.fail_after(10):
            raw = await open_store(f"file://{tmp_path}/snaps/i-test/evt-1").get("manifest.json")
    assert "0/3 records" in str(caught.value) and "gate journal: gate control socket" in str(caught.value)
    manifest = Manifest.from_json(raw)
    assert manifest.requests == 3 and not manifest.complete


class GateGone(EntryJournal):
    """A gate whose control socket does not answer at all, not even the count."""

    async def count(self) -> int:
        raise GateError("gate control socket: connection refused")


async def test_a_gate_that_cannot_even_count_fails_the_step_instead_of_passing_for_idle(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10), pytest.raises(StoreError, match="could not be read") as caught:
            await take_snapshot(make_ctx(config, http, GateGone(list(fill_journal(2)))))
        with anyio.fail_after(10):
            raw = await open_store(f"file://{tmp_path}/snaps/i-test/evt-1").get("manifest.json")
    assert "connection refused" in str(caught.value)
    assert not Manifest.from_json(raw).complete  # written all the same, saying what went wrong


class SlowRelease(EntryJournal):
    """A gate whose answer to the release of the recorded requests never comes (a stalled control socket)."""

    async def release(self, request_ids: Sequence[str]) -> None:
        await anyio.sleep_forever()


async def test_a_slow_release_does_not_cost_a_stored_snapshot_its_outcome(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps").replace("drain", snapshot_budget=2.0)
    journal = SlowRelease(list(fill_journal(3)))
    detail = ""
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            with anyio.CancelScope(deadline=anyio.current_time() + 2.0) as step:  # as the drain engine runs a step
                detail = await take_snapshot(make_ctx(config, http, journal))
    assert not step.cancelled_caught and "3/3 records" in detail


async def test_a_stalled_look_for_an_earlier_manifest_keeps_to_the_step_time(
        moto_url: str, bucket: str, stalling_proxy: Callable[[StallWhen], str]) -> None:
    # Nothing in flight: the step first looks for the manifest of an earlier attempt (a resumed drain), and the
    # store never answers that read. On a one-second step the look must leave the manifest its own slice.
    looked: list[str] = []

    def stall_first_manifest_read(path: str) -> bool:
        if path.endswith("/manifest.json") and not looked:
            looked.append(path)
            return True
        return False

    proxy = await stalling_proxy(stall_first_manifest_read)
    config = s3_config(bucket, proxy).replace("drain", snapshot_budget=1.0)
    detail = ""
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            with anyio.CancelScope(deadline=anyio.current_time() + 1.0) as step:  # as the drain engine runs a step
                detail = await take_snapshot(make_ctx(config, http, EntryJournal()))
        assert looked and not step.cancelled_caught and "0/0 records" in detail
        with anyio.fail_after(10):
            raw = await open_store(f"s3://{bucket}/spotguard/i-test/evt-1",
                                   StoreOptions(endpoint_url=moto_url)).get("manifest.json")
    assert Manifest.from_json(raw).complete


def _open_handles(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += int(os.readlink(fd) == str(path))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return count


async def test_a_sealer_that_cannot_start_leaves_no_file_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoEntropy(crypto.Sealer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError("getrandom: no entropy yet")  # os.urandom for the object's salt, early in a boot

    monkeypatch.setattr(crypto, "Sealer", NoEntropy)
    source = tmp_path / "slot.bin"
    source.write_bytes(os.urandom(1024))
    store = open_store(f"file://{tmp_path}/snaps")
    with anyio.fail_after(10), pytest.raises(OSError, match="no entropy") as caught:
        await put_file(store, crypto.Key(os.urandom(32)), "i-test/evt-1/kv/slot-0.bin",
                       crypto.binding("i-test", "evt-1", "kv/slot-0.bin"), source)
    assert caught.traceback  # held here, it keeps a handle the call left open alive (and open) until now
    assert _open_handles(source) == 0, "the slot file was left open"
