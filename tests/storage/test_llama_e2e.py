"""End to end with real llama-servers: requests stream through the gate, the snapshot cuts them and saves
records + KV slot files to moto S3, and a second llama-server resumes them from its restored slots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
import structlog

from spotguard.config import Config
from spotguard.storage.model_hash import sha256_file
from spotguard.storage.reader import open_snapshot
from spotguard.storage.resume import resume
from spotguard.storage.snapshot import prepare
from spotguard.storage.store import StoreOptions
from tests.storage.conftest import StallWhen, make_ctx, take_snapshot
from tests.storage.hostile import cli, write_config
from tests.support.gate import StartGate
from tests.support.llama import LlamaServer

pytestmark = [pytest.mark.anyio, pytest.mark.llama]

PROMPT = "The quick brown fox jumps over the lazy dog. " * 12


async def _stream(http: httpx.AsyncClient, url: str, body: dict[str, object]) -> None:
    async with http.stream("POST", url, json=body) as response:
        async for _ in response.aiter_raw():
            pass


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_snapshot_then_resume_on_another_server_uses_restored_cache(
        endpoint: str, llama_server_factory: Callable[..., LlamaServer], start_gate: StartGate,
        tiny_model: Path, tmp_path: Path, moto_url: str, bucket: str) -> None:
    source = llama_server_factory(slots=2, ctx=8192, slot_save_path=tmp_path / "source-slots")
    target = llama_server_factory(slots=2, ctx=8192, slot_save_path=tmp_path / "target-slots")
    gate = await start_gate(source.url)
    config = (Config()
              .replace("snapshot", url=f"s3://{bucket}/snaps", endpoint_url=moto_url,
                       slot_save_path=str(tmp_path / "source-slots"), model_path=str(tiny_model))
              .replace("server", kind="llamacpp", url=source.url))
    snapshotter = await prepare(config)
    with anyio.fail_after(30):
        await snapshotter.stamp_model(structlog.get_logger("test"))  # the daemon runs this in the background
    body: dict[str, object] = {"model": "tiny", "max_tokens": 7000, "stream": True, "temperature": 0}
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    async with httpx.AsyncClient(timeout=60) as http, anyio.create_task_group() as tg:
        tg.start_soon(_stream, http, f"{gate.url}{endpoint}", body)
        with anyio.fail_after(30):
            while not (gate.entries() and len(gate.entries()[0].output) > 40):
                await anyio.sleep(0.02)
        with anyio.fail_after(30):
            detail = await take_snapshot(make_ctx(config, http, gate.gate.journal), snapshotter)
            tg.cancel_scope.cancel()  # the gate ended the stream already; do not wait on the client
    assert "1/1 records, 1 kv slots" in detail, detail
    assert len(gate.entries()) == 0, "the snapshot removes the requests it cut once their records are stored"
    assert not list((tmp_path / "source-slots").iterdir()), "local slot files are cleaned up after upload"

    url = f"s3://{bucket}/snaps/i-test/evt-1"
    options = StoreOptions(endpoint_url=moto_url)
    with anyio.fail_after(30):
        snap = await open_snapshot(url, options)
        assert await snap.verify() == []
        (record,) = await snap.records()
        meta = json.loads(await snap.read("kv/slot-0.json" if any(
            e.name == "kv/slot-0.json" for e in snap.manifest.objects) else "kv/slot-1.json"))
    model_sha = sha256_file(str(tiny_model))
    assert snap.manifest.complete
    assert snap.manifest.engine is not None and snap.manifest.engine.model_sha256 == model_sha
    assert snap.manifest.engine.total_slots == 2 and snap.manifest.engine.n_ctx > 0
    assert meta["model_sha256"] == model_sha and meta["request_id"] == record.id and meta["tokens"] > 0
    assert json.loads(record.body_bytes()) == body and len(record.output) > 40

    with anyio.fail_after(120):
        results = await resume(url, target.url, engine="llamacpp", slot_dir=str(tmp_path / "target-slots"),
                               options=options, model_sha256=model_sha, max_tokens=16)
        async with httpx.AsyncClient(timeout=10) as http:
            prompt = PROMPT
            if endpoint.endswith("chat/completions"):
                prompt = (await http.post(f"{target.url}/apply-template", json={"messages": body["messages"]})
                          ).json()["prompt"]
            prompt_tokens = len((await http.post(f"{target.url}/tokenize", json={"content": prompt})).json()["tokens"])
    (result,) = results
    assert result.ok, result.error
    assert result.kv_restored
    # A fresh server has nothing cached: every cached token came from the restored slot. The whole prompt
    # is reused, and the saved output too up to where re-tokenizing the text differs from the generated ids.
    assert result.cache_n is not None and result.cache_n >= prompt_tokens, (result.cache_n, prompt_tokens)


async def test_stalled_kv_upload_leaves_records_and_an_honest_manifest(
        llama_server: LlamaServer, start_gate: StartGate, tmp_path: Path, moto_url: str, bucket: str,
        stalling_proxy: Callable[[StallWhen], str]) -> None:
    """Records land; the KV upload stalls; at the budget the step stops and the manifest names the slot."""
    assert llama_server.slot_save_path is not None
    proxy = await stalling_proxy(lambda path: "/kv/" in path)
    gate = await start_gate(llama_server.url)
    config = (Config()
              .replace("snapshot", url=f"s3://{bucket}/snaps", endpoint_url=proxy,
                       slot_save_path=str(llama_server.slot_save_path))
              .replace("server", kind="llamacpp", url=llama_server.url)
              .replace("drain", snapshot_budget=3.0))
    body = {"model": "tiny", "max_tokens": 7000, "stream": True, "prompt": PROMPT}
    async with httpx.AsyncClient(timeout=60) as http, anyio.create_task_group() as tg:
        tg.start_soon(_stream, http, f"{gate.url}/v1/completions", body)
        with anyio.fail_after(30):
            while not (gate.entries() and gate.entries()[0].output):
                await anyio.sleep(0.02)
        # Stops at its 3 s budget on its own (the manifest below says "budget ran out"); fail_after(10) only
        # guards against a hang.
        with anyio.fail_after(10):
            detail = await take_snapshot(make_ctx(config, http, gate.gate.journal))
        tg.cancel_scope.cancel()
    assert "1/1 records, 0 kv slots, 1 missing" in detail
    with anyio.fail_after(10):
        snap = await open_snapshot(f"s3://{bucket}/snaps/i-test/evt-1", StoreOptions(endpoint_url=moto_url))
        assert len(await snap.records()) == 1
    assert not snap.manifest.complete
    (missing,) = snap.manifest.missing
    assert missing.what.startswith("kv/slot-") and missing.reason == "budget ran out"


async def test_two_requests_without_known_slots_resume_from_their_own_caches(
        llama_server_factory: Callable[..., LlamaServer], start_gate: StartGate, tmp_path: Path, tiny_model: Path,
        moto_url: str, bucket: str) -> None:
    """The gate did not learn which slot served which request: both slot files are restored and each
    continuation finds its own cache through llama-server's prompt-similarity slot choice. Resumed with the
    real ``spotguard resume`` command, which hashes ``--model`` and checks it against the snapshot's."""
    source = llama_server_factory(slots=2, ctx=8192, slot_save_path=tmp_path / "source-slots")
    target = llama_server_factory(slots=2, ctx=8192, slot_save_path=tmp_path / "target-slots")
    spare = llama_server_factory(slots=2, ctx=8192, slot_save_path=tmp_path / "spare-slots")
    gate = await start_gate(source.url)
    config = (Config()
              .replace("snapshot", url=f"s3://{bucket}/snaps", endpoint_url=moto_url,
                       slot_save_path=str(tmp_path / "source-slots"), model_path=str(tiny_model))
              .replace("server", kind="llamacpp", url=source.url))
    snapshotter = await prepare(config)  # hashes the model once, as the daemon does at startup
    prompts = ["Alpha beta gamma delta epsilon. " * 10, "Red green blue yellow purple orange. " * 10]
    async with httpx.AsyncClient(timeout=60) as http, anyio.create_task_group() as tg:
        for prompt in prompts:
            tg.start_soon(_stream, http, f"{gate.url}/v1/completions",
                          {"model": "tiny", "max_tokens": 7000, "stream": True, "temperature": 0, "prompt": prompt})
        with anyio.fail_after(30):
            while not (len(gate.entries()) == 2 and all(len(r.output) > 20 for r in gate.entries())):
                await anyio.sleep(0.02)
        with anyio.fail_after(30):
            detail = await take_snapshot(make_ctx(config, http, gate.gate.journal), snapshotter)
        tg.cancel_scope.cancel()
    assert "2/2 records, 2 kv slots, 0 missing" in detail, detail
    url = f"s3://{bucket}/snaps/i-test/evt-1"
    cli_config = write_config(tmp_path / "c.toml", endpoint_url=moto_url)
    args = ["resume", url, "--engine", "llamacpp", "--max-tokens", "8", "--jsonl", "-", "--config", str(cli_config)]
    with anyio.fail_after(120):
        # No model given (on a spare server, so its caches stay out of the real run): nothing is restored.
        code, out, err = await cli(*args, "--to", spare.url, "--slot-dir", str(tmp_path / "spare-slots"))
        assert code == 0, err
        assert [json.loads(line)["kv_note"] for line in out.splitlines()] == [
            "the target's model sha256 is unknown (pass --model or --model-sha256)"] * 2
        assert not list((tmp_path / "spare-slots").glob("resume-*"))
        code, out, err = await cli(*args, "--to", target.url, "--slot-dir", str(tmp_path / "target-slots"),
                                   "--model", str(tiny_model))
        results = [json.loads(line) for line in out.splitlines()]
        async with httpx.AsyncClient(timeout=10) as http:
            counts = [len((await http.post(f"{target.url}/tokenize", json={"content": p})).json()["tokens"])
                      for p in prompts]
    assert code == 0 and [r["ok"] for r in results] == [True, True], err
    for result, prompt_tokens in zip(results, counts, strict=True):
        assert result["cache_n"] is not None and result["cache_n"] >= prompt_tokens, (result, prompt_tokens)
        assert result["text"]  # the continuation itself comes back
