"""The gate in front of a fake OpenAI-compatible engine, over real HTTP on loopback."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import structlog.testing

from spotguard.gate.registry import READ_CHECK
from tests.support.gate import StartGate, gate_garbage
from tests.support.moto import free_port
from tests.support.openai_upstream import FakeEngine, token

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    """Poll ``condition()`` until true, failing after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def read_events(lines: AsyncIterator[str], count: int) -> list[str]:
    """The next ``count`` SSE data payloads."""
    events: list[str] = []
    async for line in lines:
        if line.startswith("data: "):
            events.append(line[6:])
            if len(events) == count:
                break
    return events


def chat_body(**extra: object) -> bytes:
    return json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


async def test_stream_is_journaled_with_output_so_far(fake_engine: FakeEngine, start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)
    body = chat_body(stream=True, max_tokens=6, x_hold_after=3)
    async with httpx.AsyncClient(base_url=gw.url) as client:
        with anyio.fail_after(10):
            async with client.stream("POST", CHAT, content=body, headers={"content-type": "application/json"}) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"] == "text/event-stream"
                lines = resp.aiter_lines()
                assert len(await read_events(lines, 3)) == 3
                [entry] = gw.entries()
                assert entry.endpoint == CHAT and entry.model == "fake-model" and entry.stream
                assert entry.body == body  # unchanged, byte for byte
                assert entry.output == token(0) + token(1) + token(2)
                assert gw.gate.inflight == 1
                fake_engine.release.set()
                rest = [event async for event in _data(lines)]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert len(gw.entries()) == 0
    assert gw.count("chat", "ok") == 1


async def _data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        if line.startswith("data: "):
            yield line[6:]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [True, False])
async def test_answers_are_passed_through_byte_for_byte(fake_engine: FakeEngine, start_gate: StartGate,
                                                        path: str, stream: bool) -> None:
    gw = await start_gate(fake_engine.url)
    body = json.dumps({"model": "m", "prompt": "x", "messages": [], "stream": stream, "max_tokens": 5}).encode()
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(10):
            direct = await client.post(fake_engine.url + path, content=body)
            gated = await client.post(gw.url + path, content=body)
    assert gated.status_code == direct.status_code == 200
    assert gated.content == direct.content
    assert gated.headers["content-type"] == direct.headers["content-type"]
    assert len(gw.entries()) == 0
    assert gw.count("chat" if path == CHAT else "completions", "ok") == 1


async def test_non_streaming_request_is_journaled_while_the_engine_works(fake_engine: FakeEngine,
                                                                         start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)
    body = json.dumps({"model": "m", "prompt": "p", "max_tokens": 3, "x_hold_after": 0}).encode()
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        answers: list[httpx.Response] = []

        async def call() -> None:
            answers.append(await client.post(gw.url + COMPLETIONS, content=body, timeout=10))

        tg.start_soon(call)
        await wait_for(lambda: fake_engine.holding == 1)
        [entry] = gw.entries()
        assert (entry.endpoint, entry.model, entry.stream, entry.output) == (COMPLETIONS, "m", False, "")
        fake_engine.release.set()
        await wait_for(lambda: bool(answers))
    assert answers[0].json()["choices"][0]["text"] == "tok0 tok1 tok2 "
    assert gw.entries() == []


async def test_draining_refuses_new_requests_while_in_flight_streams_continue(fake_engine: FakeEngine,
                                                                              start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, retry_after=7)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(10):
            async with client.stream("POST", CHAT, content=chat_body(stream=True, max_tokens=4, x_hold_after=2)) as resp:
                lines = resp.aiter_lines()
                await read_events(lines, 2)
                gw.gate.set_draining(True)
                for method, path in (("POST", CHAT), ("POST", COMPLETIONS), ("GET", "/v1/models")):
                    refused = await client.request(method, path, content=chat_body() if method == "POST" else None)
                    assert refused.status_code == 503
                    assert refused.headers["retry-after"] == "7"
                    assert refused.json()["error"]["type"] == "unavailable"
                fake_engine.release.set()
                rest = [event async for event in _data(lines)]
            assert rest[-1] == "[DONE]"  # the in-flight stream ran to its end
            assert gw.count("chat", "rejected") == 1 and gw.count("other", "rejected") == 1
            gw.gate.set_draining(False)
            assert (await client.post(COMPLETIONS, content=b'{"prompt":"x"}')).status_code == 200


async def test_interrupt_closes_upstream_and_ends_the_stream_cleanly(fake_engine: FakeEngine,
                                                                     start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(10):
            async with client.stream("POST", CHAT, content=chat_body(stream=True, max_tokens=9, x_hold_after=2)) as resp:
                lines = resp.aiter_lines()
                await read_events(lines, 2)
                cut = await gw.gate.journal.interrupt_and_wait(timeout=5)
                rest = [event async for event in _data(lines)]  # ends: the gate closed the body
    assert len(cut) == 1 and cut[0].final
    assert rest == [rest[-1]] and json.loads(rest[-1])["error"]["type"] == "interrupted_for_migration"
    # the engine saw its connection close, and stopped generating
    await wait_for(lambda: fake_engine.disconnects == 1 and fake_engine.streams_open == 0)
    # The entry stays, with its output, until the snapshot step releases it.
    [entry] = gw.entries()
    assert entry == cut[0] and entry.output == token(0) + token(1) and entry.finish_reason is None
    await gw.gate.journal.release([entry.id])
    assert gw.entries() == []
    assert gw.count("chat", "interrupted") == 1


async def test_interrupt_before_a_non_streaming_answer_gives_503(fake_engine: FakeEngine,
                                                                 start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, retry_after=3)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client, anyio.create_task_group() as tg:
        answers: list[httpx.Response] = []

        async def call() -> None:
            answers.append(await client.post(COMPLETIONS, content=b'{"prompt":"p","x_hold_after":0}'))

        tg.start_soon(call)
        await wait_for(lambda: fake_engine.holding == 1)
        with anyio.fail_after(5):
            await gw.gate.journal.interrupt_and_wait(timeout=5)
        await wait_for(lambda: bool(answers))
        await wait_for(lambda: fake_engine.holding == 0)  # the engine's request was cancelled
    assert answers[0].status_code == 503 and answers[0].headers["retry-after"] == "3"
    assert answers[0].json()["error"]["type"] == "interrupted_for_migration"
    assert len(gw.entries()) == 1


async def test_client_disconnect_cancels_upstream_and_drops_the_entry(fake_engine: FakeEngine,
                                                                      start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(10):
            async with client.stream("POST", CHAT, content=chat_body(stream=True, max_tokens=9, x_hold_after=2)) as resp:
                await read_events(resp.aiter_lines(), 2)
                assert len(gw.entries()) == 1
            # leaving the block closes the client's connection mid-stream
    await wait_for(lambda: fake_engine.disconnects == 1 and len(gw.entries()) == 0)
    await wait_for(lambda: gw.count("chat", "client_disconnect") == 1)


async def test_other_requests_pass_through_untouched(fake_engine: FakeEngine, start_gate: StartGate) -> None:
    """What the path policy lets through (here opened with [gate] allow_paths) goes through untouched."""
    gw = await start_gate(fake_engine.url, allow_paths=("PUT /slots/*", "GET /v1/chat/completions", "/stream-other"))
    headers = {"authorization": "Bearer s3cret", "x-custom": "a b", "content-type": "application/octet-stream"}
    payload = bytes(range(256)) * 10
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(10):
            put = await client.put("/slots/0?action=save&x=%2F1", content=payload, headers=headers)
            teapot = await client.get("/v1/models?status=418")
            get_chat = await client.get(CHAT)  # not a POST: not journaled
            streamed = await client.get("/stream-other")
    assert put.status_code == 200 and put.headers["x-engine"] == "fake"
    echo = put.json()
    assert (echo["method"], echo["path"], echo["query"]) == ("PUT", "/slots/0", "action=save&x=%2F1")
    assert base64.b64decode(echo["body"]) == payload
    seen = dict((k, v) for k, v in echo["headers"])
    assert {k: seen[k] for k in headers} == headers  # authorization forwarded as is
    assert seen["host"] == fake_engine.url.removeprefix("http://")
    assert teapot.status_code == 418
    assert get_chat.json()["method"] == "GET" and len(gw.entries()) == 0
    assert streamed.text == "".join(f"part{i}\n" for i in range(5))
    assert gw.count("other", "ok") == 4


async def test_malformed_upstream_is_passed_through_and_counted(fake_engine: FakeEngine,
                                                                start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(10):
            for extra in ({"stream": True, "x_malformed": "sse"}, {"x_malformed": "json"}):
                body = chat_body(max_tokens=3, **extra)
                direct = await client.post(fake_engine.url + CHAT, content=body)
                gated = await client.post(gw.url + CHAT, content=body)
                assert gated.status_code == 200 and gated.content == direct.content
            again = await client.post(gw.url + CHAT, content=chat_body(max_tokens=2))
    assert again.status_code == 200
    assert gw.count("chat", "malformed") == 2 and gw.count("chat", "ok") == 1
    assert len(gw.entries()) == 0


async def test_one_streamed_answer_in_read_check_is_read_to_its_end_to_count_the_unreadable(
        fake_engine: FakeEngine, start_gate: StartGate) -> None:
    """Reading every stream to its end cost a fifth of the gate's CPU: a sample is (the first one included), so
    an engine whose events the gate cannot read is still counted long before a drain needs to read them."""
    gw = await start_gate(fake_engine.url)
    body = chat_body(max_tokens=3, stream=True, x_malformed="sse")
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(30):
            for _ in range(READ_CHECK + 1):
                gated = await client.post(gw.url + CHAT, content=body)
                assert gated.status_code == 200
    assert gw.count("chat", "malformed") == 2 and gw.count("chat", "ok") == READ_CHECK - 1
    assert len(gw.entries()) == 0


async def test_an_engine_that_stops_sending_mid_answer_is_given_up_after_the_read_timeout(
        fake_engine: FakeEngine, start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, read_timeout=1.0)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        with anyio.fail_after(20):
            async with client.stream("POST", CHAT, content=chat_body(stream=True, max_tokens=6, x_hold_after=2)) as resp:
                lines = resp.aiter_lines()
                assert len(await read_events(lines, 2)) == 2
                with pytest.raises(httpx.RemoteProtocolError):  # cut short, not passed off as a whole answer
                    async for _ in lines:
                        pass
    assert gw.count("chat", "upstream_error") == 1
    assert len(gw.entries()) == 0


async def test_an_answer_that_keeps_coming_is_not_timed_out_however_long_it_takes(
        fake_engine: FakeEngine, start_gate: StartGate) -> None:
    """The timeout is on silence (reads are noted by a flag the sweep looks at), not on the whole answer."""
    gw = await start_gate(fake_engine.url, read_timeout=1.0)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        with anyio.fail_after(20):
            answer = await client.post(CHAT, content=chat_body(stream=True, max_tokens=8, x_token_delay=0.4))
    assert answer.status_code == 200 and answer.text.rstrip().endswith("data: [DONE]")
    assert gw.count("chat", "ok") == 1 and gw.count("chat", "upstream_error") == 0


async def test_a_finished_request_leaves_nothing_to_the_cyclic_garbage_collector(
        fake_engine: FakeEngine, start_gate: StartGate) -> None:
    """Freed as it ends: with a reference cycle per request (exchange <-> flight) they piled up for collections
    that paused the gate ~16 ms every few thousand requests, in its tail latency. A closed connection and its
    parser (whose callbacks are the connection's methods) were one more cycle each."""
    gw = await start_gate(fake_engine.url)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(20):
            assert (await client.post(CHAT, content=chat_body(stream=True, max_tokens=3))).status_code == 200
            with gate_garbage() as left:
                for body in (chat_body(stream=True, max_tokens=3), chat_body(max_tokens=3)):
                    assert (await client.post(CHAT, content=body)).status_code == 200
                # and a connection that closes after its answer, with the gate's parser for it
                async with httpx.AsyncClient(base_url=gw.url, timeout=10) as once:
                    assert (await once.post(CHAT, content=chat_body(max_tokens=3))).status_code == 200
                while len(gw.gate.connections) > 1:
                    await anyio.sleep(0.01)
    assert left == set()


async def test_request_body_that_is_not_json_goes_to_the_engine_unjournaled(fake_engine: FakeEngine,
                                                                            start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(10):
            answer = await client.post(gw.url + CHAT, content=b"{nope")
    assert answer.status_code == 400  # the engine's own answer
    assert fake_engine.requests[-1].body == b"{nope"
    assert gw.count("chat", "bad_request") == 1


async def test_unreachable_engine_gives_502(start_gate: StartGate) -> None:
    gw = await start_gate(f"http://127.0.0.1:{free_port()}")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(10):
            chat = await client.post(CHAT, content=chat_body(stream=True))
            other = await client.get("/health")
    assert chat.status_code == other.status_code == 502
    assert chat.json()["error"]["type"] == "upstream_error"
    assert len(gw.entries()) == 0
    assert gw.count("chat", "upstream_error") == 1 and gw.count("other", "upstream_error") == 1


async def test_chunked_upload_and_head_pass_through(fake_engine: FakeEngine, start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, allow_paths=("PUT /upload",))  # not an inference path: opened here

    async def parts() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"part{i};".encode()

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        with anyio.fail_after(10):
            put = await client.put("/upload", content=parts())  # no length: sent chunked
            head = await client.head("/v1/models")
            after = await client.get("/v1/models")  # the connection is still good after a HEAD
    assert base64.b64decode(put.json()["body"]) == b"part0;part1;part2;"
    assert head.status_code == 200 and head.content == b""
    assert after.json()["path"] == "/v1/models"
    assert gw.count("other", "ok") == 3


async def test_pipelined_requests_are_answered_in_order(fake_engine: FakeEngine, start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, allow_paths=("GET /first", "GET /second"))
    host, port = gw.url.removeprefix("http://").split(":")
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(host, int(port)) as sock:
            await sock.send(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\nGET /second HTTP/1.1\r\nhost: x\r\n"
                            b"connection: close\r\n\r\n")
            received = b""
            try:
                while True:
                    received += await sock.receive()
            except anyio.EndOfStream:
                pass
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert received.index(b'"/first"') < received.index(b'"/second"')


async def test_a_fault_in_the_gate_itself_is_a_logged_500_not_the_clients_400(fake_engine: FakeEngine,
                                                                             start_gate: StartGate) -> None:
    # A bug in the gate's own handling (here: its request handler raises) must not be blamed on the client
    # with the gate's internal message in a 400, nor leave it unlogged.
    gw = await start_gate(fake_engine.url)

    def broken(*_: object) -> None:
        raise KeyError("sk-secret-prompt")

    gw.gate.handle = broken  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            answer = await client.post("/v1/completions", json={"model": "m", "prompt": "sk-secret-prompt"})
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "internal_error"
    assert "sk-secret" not in answer.text
    [line] = [entry for entry in logs if entry["event"] == "gate_internal_error"]
    assert line["error"] == "KeyError" and "sk-secret" not in repr(logs)
