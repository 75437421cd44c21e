"""resume() against an OpenAI-compatible server over loopback, and the reader's integrity checks."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.config import Config
from spotguard.errors import StoreError
from spotguard.gate.journal import EntryJournal
from spotguard.gate.protocol import JournalEntry
from spotguard.storage.reader import open_snapshot
from spotguard.storage.resume import _restore_slots, resume
from tests.storage.conftest import make_ctx, take_snapshot
from tests.storage.hostile import cli, entry, manifest, record, write_config
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to ten"}]}
COMPLETION = {"model": "m", "stream": True, "prompt": "One, two,", "max_tokens": 5}


def journal() -> EntryJournal:
    j = EntryJournal()
    j.add(JournalEntry(id="chat", endpoint="/v1/chat/completions", model="m", body=json.dumps(CHAT).encode(),
                          stream=True, output="one, two, "))
    j.add(JournalEntry(id="text", endpoint="/v1/completions", model="m", body=json.dumps(COMPLETION).encode(),
                          stream=True, output=" three,"))
    j.add(JournalEntry(id="done", endpoint="/v1/completions", model="m", body=json.dumps(COMPLETION).encode(),
                          stream=True, output=" x", finish_reason="stop"))
    j.add(JournalEntry(id="junk", endpoint="/v1/completions", model="m", body=b"not json", stream=False))
    return j


async def _snapshot(tmp_path: Path) -> str:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await take_snapshot(make_ctx(config, http, journal()))
    return f"file://{tmp_path}/snaps/i-test/evt-1"


@pytest.mark.parametrize("engine", ["openai", "vllm"])
async def test_resume_continues_each_request_where_it_stopped(tmp_path: Path, fake_engine: FakeEngine,
                                                              engine: str) -> None:
    url = await _snapshot(tmp_path)
    with anyio.fail_after(30):
        results = await resume(url, fake_engine.url, engine=engine)  # type: ignore[arg-type]
    by_id = {r.id: r for r in results}
    assert by_id["chat"].ok and by_id["chat"].text and by_id["text"].ok and by_id["text"].text
    assert by_id["done"].ok and by_id["done"].text == ""  # already finished: nothing sent
    assert not by_id["junk"].ok and "not JSON" in by_id["junk"].error
    sent = {r.path: json.loads(r.body) for r in fake_engine.requests}
    assert len(fake_engine.requests) == 2
    chat = sent["/v1/chat/completions"]
    assert chat["messages"] == [*CHAT["messages"], {"role": "assistant", "content": "one, two, "}]
    assert chat["stream"] is False and "stream_options" not in chat
    if engine == "vllm":
        assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False
    else:
        assert "continue_final_message" not in chat
    assert sent["/v1/completions"]["prompt"] == "One, two, three,"
    assert sent["/v1/completions"]["stream"] is False


async def test_reader_refuses_an_altered_object(tmp_path: Path) -> None:
    url = await _snapshot(tmp_path)
    records = tmp_path / "snaps" / "i-test" / "evt-1" / "records" / "000000.jsonl"
    records.write_bytes(records.read_bytes().replace(b"count to ten", b"count to six"))
    with anyio.fail_after(10):
        snap = await open_snapshot(url)
        assert [p for p in await snap.verify() if "sha256" in p] == ["records/000000.jsonl: size or sha256 differs "
                                                                      "from the manifest"]
        with pytest.raises(StoreError, match="corrupt or altered"):
            await snap.records()


async def test_download_writes_plaintext_objects(tmp_path: Path) -> None:
    url = await _snapshot(tmp_path)
    with anyio.fail_after(10):
        written = await (await open_snapshot(url)).download(str(tmp_path / "out"))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == ["records/000000.jsonl"]
    assert len((tmp_path / "out" / "records" / "000000.jsonl").read_text().splitlines()) == 4


async def test_cli_resume_prints_each_continuation_or_writes_json_lines(tmp_path: Path,
                                                                         fake_engine: FakeEngine) -> None:
    url = await _snapshot(tmp_path)
    config = write_config(tmp_path / "c.toml")
    code, out, err = await cli("resume", url, "--to", fake_engine.url, "--config", str(config))
    assert code == 1  # the junk record failed
    assert "== chat: ok" in out and "== text: ok" in out and "== junk: FAILED" in out
    assert "tok0 tok1" in out  # the continuation text itself, not only counts
    assert "not authenticated" in err
    code, out, err = await cli("resume", url, "--to", fake_engine.url, "--config", str(config), "--jsonl", "-")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in lines] == ["chat", "text", "done", "junk"]
    assert lines[0]["ok"] and lines[0]["text"].startswith("tok0") and not lines[3]["ok"]
    assert "chat: ok" in err  # the human summary moves to stderr


async def test_kv_slots_are_restored_only_against_a_known_matching_model_hash(tmp_path: Path) -> None:
    store = tmp_path / "snaps" / "i-test" / "evt-1"
    (store / "kv").mkdir(parents=True)
    (store / "records").mkdir()
    lines = (json.dumps(record("r1")) + "\n").encode()
    (store / "records" / "000000.jsonl").write_bytes(lines)
    (store / "kv" / "slot-0.bin").write_bytes(b"kv")
    doc = manifest([entry("records/000000.jsonl", "records", lines),
                    entry("kv/slot-0.bin", "kv", b"kv", request_ids=["r1"], slot_id=0, tokens=5)])
    doc["engine"] = {"kind": "llamacpp", "model_sha256": "a" * 64, "n_ctx": 8192, "total_slots": 2}
    (store / "manifest.json").write_text(json.dumps(doc))
    async with httpx.AsyncClient() as http:
        snap = await open_snapshot(f"file://{store}")
        with anyio.fail_after(10):
            unknown = await _restore_slots(snap, http, "http://127.0.0.1:9", str(tmp_path / "slots"), "", 5)
            other = await _restore_slots(snap, http, "http://127.0.0.1:9", str(tmp_path / "slots"), "b" * 64, 5)
    why = "the target's model sha256 is unknown (pass --model or --model-sha256)"
    assert unknown == ({}, {"r1": why, "*": why})
    assert other[0] == {} and other[1]["r1"] == "the target's model differs from the snapshot's"
    assert not (tmp_path / "slots").exists()
