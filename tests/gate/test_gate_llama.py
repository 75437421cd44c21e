"""The gate in front of a real llama-server running the tiny offline model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from spotguard.demo.traffic import sse_lines
from tests.support.gate import StartGate
from tests.support.llama import LlamaServer

pytestmark = [pytest.mark.anyio, pytest.mark.llama]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


async def busy_slots(client: httpx.AsyncClient, server: LlamaServer) -> list[int]:
    slots = (await client.get(server.url + "/slots")).json()
    return [slot["id"] for slot in slots if slot["is_processing"]]


async def data_events(response: httpx.Response) -> AsyncIterator[str]:
    async for line in sse_lines(response):
        if line.startswith("data: "):
            yield line[6:]


async def test_stream_journal_and_interrupt_free_the_slot(llama_server: LlamaServer, start_gate: StartGate) -> None:
    gw = await start_gate(llama_server.url)
    body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3000, "stream": True,
                       "id_slot": 1}).encode()
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(20):
            async with client.stream("POST", gw.url + COMPLETIONS, content=body) as resp:
                assert resp.status_code == 200
                events = data_events(resp)
                received = ""
                async for event in events:
                    received += json.loads(event)["choices"][0]["text"]
                    if len(received) > 20:
                        break
                [entry] = gw.entries()
                assert entry.output.startswith(received) and entry.body == body
                assert entry.slot_id == 1  # pinned by the request
                assert await busy_slots(client, llama_server) == [1]

                cut = await gw.gate.journal.interrupt_and_wait(timeout=5)
                tail = [event async for event in events]
            assert [c.id for c in cut] == [entry.id] and cut[0].final
            assert json.loads(tail[-1])["error"]["type"] == "interrupted_for_migration"
            # Closing the upstream connection made llama-server stop generating and free the slot.
            while await busy_slots(client, llama_server):
                await anyio.sleep(0.02)
    # The output so far stays in the journal for the snapshot step.
    [entry] = gw.entries()
    assert entry == cut[0] and len(entry.output) > 20 and entry.finish_reason is None
    assert gw.count("completions", "interrupted") == 1


async def test_chat_through_the_gate_matches_direct(llama_server: LlamaServer, start_gate: StartGate) -> None:
    gw = await start_gate(llama_server.url)
    for stream in (False, True):
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24,
                           "temperature": 0, "stream": stream}).encode()
        texts = []
        async with httpx.AsyncClient(timeout=20) as client:
            with anyio.fail_after(20):
                for url in (llama_server.url, gw.url):
                    answer = await client.post(url + CHAT, content=body)
                    assert answer.status_code == 200
                    if stream:
                        deltas = [json.loads(line[6:]) for line in answer.text.splitlines()
                                  if line.startswith("data: ") and line != "data: [DONE]"]
                        texts.append("".join(d["choices"][0]["delta"].get("content") or ""
                                             for d in deltas if d["choices"]))
                    else:
                        texts.append(answer.json()["choices"][0]["message"]["content"])
        assert texts[0] == texts[1] and texts[0]
    assert gw.count("chat", "ok") == 2 and len(gw.entries()) == 0


async def test_draining_with_a_real_engine(llama_server: LlamaServer, start_gate: StartGate) -> None:
    gw = await start_gate(llama_server.url, retry_after=9)
    # ignore_eos: the tiny model samples at random and now and then ends early, which is not what is tested here
    body = json.dumps({"prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}).encode()
    async with httpx.AsyncClient(timeout=20) as client:
        with anyio.fail_after(30):
            async with client.stream("POST", gw.url + COMPLETIONS, content=body) as resp:
                events = data_events(resp)
                await events.__anext__()
                gw.gate.set_draining(True)
                refused = await client.post(gw.url + COMPLETIONS, content=body)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "9"
                assert (await client.get(gw.url + "/health")).status_code == 503
                rest = [event async for event in events]
            assert rest[-1] == "[DONE]"  # the in-flight request finished normally
            assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
            # the engine itself is fine: only the gate refuses
            assert (await client.get(llama_server.url + "/health")).status_code == 200
    assert len(gw.entries()) == 0


async def test_slot_actions_pass_through_when_allowed(llama_server: LlamaServer, start_gate: StartGate) -> None:
    gw = await start_gate(llama_server.url, allow_paths=("POST /slots/*",))
    assert llama_server.slot_save_path is not None
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        with anyio.fail_after(20):
            made = await client.post(COMPLETIONS, json={"prompt": "Remember this", "max_tokens": 8, "id_slot": 1,
                                                        "cache_prompt": True})
            assert made.status_code == 200
            saved = await client.post("/slots/1?action=save", json={"filename": "one.bin"})
            restored = await client.post("/slots/0?action=restore", json={"filename": "one.bin"})
            bad = await client.post("/slots/0?action=save", json={"filename": "../escape.bin"})
    assert saved.status_code == 200 and saved.json()["n_saved"] > 0
    assert (llama_server.slot_save_path / "one.bin").stat().st_size == saved.json()["n_written"]
    assert restored.status_code == 200 and restored.json()["n_restored"] == saved.json()["n_saved"]
    assert bad.status_code == 400


async def raw_request(url: str, head: bytes) -> tuple[int, bytes]:
    """One request written byte for byte (no client normalises the path), and the answer's status and body."""
    host, port = url.removeprefix("http://").split(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(head)
        data = b""
        with anyio.move_on_after(10):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def test_admin_endpoints_are_403_while_inference_works(llama_server: LlamaServer,
                                                            start_gate: StartGate) -> None:
    gw = await start_gate(llama_server.url)
    body = b'{"filename":"x.bin"}'
    attacks = [b"/slots/0?action=erase", b"/%73lots/0?action=erase", b"/v1/chat/completions/../../slots/0?action=erase",
               b"/v1/models/..%2F..%2Fslots/1?action=restore", b"//slots/0?action=save", b"/%2573lots/0?action=erase"]
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(60):
            for target in attacks:
                status, answer = await raw_request(gw.url, b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n"
                                                   b"Content-Type: application/json\r\nConnection: close\r\n"
                                                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                assert status == 403, target
                assert json.loads(answer)["error"]["type"] == "forbidden"
            for path in ("/slots", "/props", "/metrics"):
                assert (await client.get(gw.url + path)).status_code == 403
            # The same erase straight to the engine works: the endpoint is real, only the gate refuses it.
            assert (await client.post(llama_server.url + "/slots/0?action=erase")).status_code == 200
            chat = await client.post(gw.url + CHAT, json={"model": "tiny", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            models = await client.get(gw.url + "/v1/models")
            health = await client.get(gw.url + "/health")
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    assert models.status_code == 200 and health.status_code == 200
    assert gw.count("other", "forbidden") == len(attacks) + 3
