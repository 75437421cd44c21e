"""Resume through real gates over loopback: every event carries its cursor, a client that went away comes back
for the rest, a retry is answered from what was held (not computed again), a cursor works only for its own
request and Authorization, a continuation's new holder says so, and when the holder is gone the fleet's
index lets another gate finish the answer from the output so far.

Gates run in this process (``start_gate``) in front of fake engines; the index is a file:// store.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from spotguard.asgi import Receive, Scope, Send, read_body, serve
from spotguard.gate.cursor import CursorKey
from spotguard.gate.held import HeldBook
from spotguard.gate.holding import Holding
from spotguard.gate.limits import ClientLimits
from spotguard.gate.listen import nodelay_socket
from spotguard.gate.protocol import DesiredState, EntryState
from spotguard.metrics import Metrics
from spotguard.storage.answer_index import AnswerIndex
from spotguard.storage.store import StoreOptions, open_store
from tests.support.gate import RunningGate, StartGate, gate_garbage
from tests.support.openai_upstream import FakeEngine, chat_chunk, token

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
KEY = CursorKey.from_bytes(os.urandom(32))
ALICE = {"authorization": "Bearer sk-alice"}


@pytest.fixture
async def engines() -> AsyncIterator[Callable[[], FakeEngine]]:
    """``engines()`` serves one more fake engine for the test (released: it does not hold)."""
    async with anyio.create_task_group() as tg:
        async def start() -> FakeEngine:
            engine = FakeEngine()
            engine.release.set()
            engine.url = (await tg.start(serve, engine, nodelay_socket("127.0.0.1", 0))).url
            return engine

        yield start  # type: ignore[misc]
        tg.cancel_scope.cancel()


def holding(store: Path | None = None, **kwargs: Any) -> Holding:
    index = None
    if store is not None:
        index = AnswerIndex(open_store(f"file://{store}", StoreOptions()), index_key=KEY.index_key, seal_key=None)
    book = HeldBook(ttl=600, max_bytes=64 << 20, max_answer_bytes=16 << 20, log=structlog.get_logger("test"),
                    metrics=Metrics())
    return Holding(key=KEY, holder="http://unset:1", book=book, index=index, **kwargs)


async def resumable_gate(start_gate: StartGate, upstream: str, store: Path | None = None, *,
                         keep_generating: bool = True, **kwargs: Any) -> RunningGate:
    held = holding(store, keep_generating=keep_generating)
    gw = await start_gate(upstream, holding=held, engine_kind="vllm", **kwargs)
    held.holder = gw.url  # the URL other gates reach it on, named in its cursors
    return gw


def events(text: str) -> list[tuple[str, str | None]]:
    """(data, id) of each SSE event in ``text``."""
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        ids = [line[4:] for line in block.split("\n") if line.startswith("id: ")]
        if data:
            found.append(("\n".join(data), ids[-1] if ids else None))
    return found


def content(found: list[tuple[str, str | None]]) -> str:
    text = ""
    for data, _ in found:
        if data != "[DONE]":
            delta = json.loads(data)["choices"][0].get("delta", {})
            text += delta.get("content") or ""
    return text


def chat(**extra: object) -> bytes:
    return json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


async def test_every_event_carries_a_cursor_for_its_request_and_requester(engines: Any, start_gate: StartGate) -> None:
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url)
    body = chat(stream=True, max_tokens=5)
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(gw.url + CHAT, content=body, headers=ALICE)
    found = events(answer.text)
    assert answer.headers["spotguard-holder"] and [d for d, _ in found][-1] == "[DONE]"
    fingerprint = KEY.fingerprint(ALICE["authorization"], body)
    offsets = [KEY.verify(i or "", fingerprint=fingerprint, now=datetime.now(UTC).timestamp()).offset for _, i in found]
    assert offsets == list(range(1, len(found) + 1))
    with pytest.raises(Exception, match="refused"):
        KEY.verify(found[0][1] or "", fingerprint=KEY.fingerprint("Bearer sk-mallory", body), now=0)


async def leave_after_five_events(client: httpx.AsyncClient, url: str, body: bytes) -> list[tuple[str, str | None]]:
    """Alice's stream, left (the connection closed) once five whole events are in: those events."""
    got = ""
    async with client.stream("POST", url, content=body, headers=ALICE) as response:
        async for chunk in response.aiter_text():
            got += chunk
            if got.count("\n\n") >= 5:
                break  # the client goes away mid-answer
    return events(got[:got.rindex("\n\n") + 2])


async def leave_and_come_back(client: httpx.AsyncClient, gw: RunningGate, engine: FakeEngine,
                              body: bytes) -> tuple[list[tuple[str, str | None]], httpx.Response]:
    """Alice leaves her stream after five events, waits until the engine has finished it (it was not stopped:
    the answer is held) and comes back with her last cursor: the events she had, and the resume's answer."""
    first = await leave_after_five_events(client, gw.url + CHAT, body)
    while not engine.requests or engine.streams_open:
        await anyio.sleep(0.01)
    assert engine.disconnects == 0
    rest = await client.post(gw.url + CHAT, content=body, headers={**ALICE, "last-event-id": first[-1][1] or ""})
    return first, rest


async def test_a_client_that_went_away_resumes_exactly_after_its_last_event(engines: Any,
                                                                            start_gate: StartGate) -> None:
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url)
    body = chat(stream=True, max_tokens=40, x_token_delay=0.01)
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(20):
            first, rest = await leave_and_come_back(client, gw, engine, body)
    assert rest.status_code == 200 and rest.headers["spotguard-resumed"] == "1"
    joined = first + events(rest.text)
    assert content(joined) == "".join(token(i) for i in range(40))
    assert [d for d, _ in joined].count("[DONE]") == 1 and len(engine.requests) == 1
    assert gw.count("chat", "resumed") == 1


async def test_resuming_leaves_nothing_to_the_cyclic_garbage_collector(engines: Any, start_gate: StartGate) -> None:
    """An answer held for a client that went away, and the resume that replays it (a resumption leg, a
    subscription to the held answer), are freed as they end."""
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url)
    body = chat(stream=True, max_tokens=20, x_token_delay=0.01)
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(20):
            assert (await client.post(gw.url + CHAT, content=chat(max_tokens=2), headers=ALICE)).status_code == 200
            with gate_garbage() as left:
                _, rest = await leave_and_come_back(client, gw, engine, body)
    assert rest.headers["spotguard-resumed"] == "1" and events(rest.text)[-1][0] == "[DONE]"
    assert left == set()


async def test_a_retry_whose_body_the_gate_cannot_hold_now_is_told_when_to_try_again(engines: Any,
                                                                                     start_gate: StartGate) -> None:
    """A retry (the SDK's retry count) is read by the resumption leg; over the gate's body budget it gets the
    same 503 + Retry-After as any request, not a bare 503."""
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url, limits=ClientLimits(body_memory=1000))
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(10):
            answer = await client.post(gw.url + CHAT, content=chat(max_tokens=2, pad="x" * 2000),
                                       headers={**ALICE, "x-stainless-retry-count": "1"})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert gw.count("chat", "body_memory") == 1 and not engine.requests


async def test_without_keep_generating_a_client_that_went_away_is_told_at_once_its_answer_is_gone(
        engines: Any, start_gate: StartGate) -> None:
    # [resume] keep_generating = false: the engine stops when the client goes. What was held of the answer is
    # final, so a resume of it is refused at once (send it again without a cursor), not left waiting for more.
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url, keep_generating=False)
    body = chat(stream=True, max_tokens=400, x_token_delay=0.01)
    async with httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(10):
            last = (await leave_after_five_events(client, gw.url + CHAT, body))[-1][1] or ""
            while not engine.disconnects:  # the engine was stopped
                await anyio.sleep(0.01)
        with anyio.fail_after(10):
            again = await client.post(gw.url + CHAT, content=body, headers={**ALICE, "last-event-id": last})
    assert again.status_code == 409 and again.json()["error"]["type"] == "resume_unavailable"
    assert len(engine.requests) == 1


async def test_a_cursor_is_refused_with_another_authorization_or_request(engines: Any,
                                                                         start_gate: StartGate) -> None:
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url)
    body = chat(stream=True, max_tokens=4)
    async with httpx.AsyncClient(timeout=10) as client:
        first = events((await client.post(gw.url + CHAT, content=body, headers=ALICE)).text)
        cursor = first[1][1] or ""
        other_key = await client.post(gw.url + CHAT, content=body,
                                      headers={"authorization": "Bearer sk-mallory", "last-event-id": cursor})
        other_body = await client.post(gw.url + CHAT, content=chat(stream=True, max_tokens=5),
                                       headers={**ALICE, "last-event-id": cursor})
        altered = await client.post(gw.url + CHAT, content=body, headers={**ALICE, "last-event-id": cursor[:-3] + "x.1"})
    for refused in (other_key, other_body, altered):
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "resume_refused", refused.text
    assert len(engine.requests) == 1 and gw.count("chat", "resume_refused") == 3


async def test_a_retried_non_streaming_request_is_answered_from_what_was_held(engines: Any,
                                                                              start_gate: StartGate) -> None:
    engine = await engines()
    gw = await resumable_gate(start_gate, engine.url)
    body = chat(max_tokens=6)
    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.post(gw.url + CHAT, content=body, headers={**ALICE, "x-stainless-retry-count": "0"})
        again = await client.post(gw.url + CHAT, content=body, headers={**ALICE, "x-stainless-retry-count": "1"})
        fresh = await client.post(gw.url + CHAT, content=body, headers={"authorization": "Bearer sk-bob",
                                                                       "x-stainless-retry-count": "1"})
    assert first.json()["choices"][0]["message"]["content"] == "".join(token(i) for i in range(6))
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert again.headers["spotguard-resumed"] == "1"
    assert fresh.status_code == 200 and "spotguard-resumed" not in fresh.headers  # Bob's request is his own
    assert len(engine.requests) == 2  # Alice's retry was not computed again; Bob's was computed


async def test_a_gate_that_takes_a_continuation_holds_it_and_a_retry_goes_there(engines: Any,
                                                                                start_gate: StartGate) -> None:
    engine_a, engine_b = await engines(), await engines()
    b = await resumable_gate(start_gate, engine_b.url)
    a = await resumable_gate(start_gate, engine_a.url, peers=(b.url,))
    body = chat(stream=True, max_tokens=60, x_token_delay=0.05)
    got = ""
    async with httpx.AsyncClient(timeout=20) as client:
        with anyio.fail_after(20):
            async with client.stream("POST", a.url + CHAT, content=body, headers=ALICE) as response:
                async for chunk in response.aiter_text():
                    got += chunk
                    if got.count("\n\n") == 5:
                        a.gate.apply(DesiredState(generation=1, draining=True,
                                                  vm_deadline=datetime.now(UTC) + timedelta(seconds=2.5)))
                        [moved] = a.interrupt_all()
                        assert moved.state is EntryState.MIGRATED
        first = events(got)
        error = json.loads(first[-1][0])["error"]
        assert error["resumable"] is True  # A went away before the end: the client resumes where it is
        last_id = first[-1][1] or ""
        holder = KEY.verify(last_id, fingerprint=KEY.fingerprint(ALICE["authorization"], body), now=0).holder
        assert holder == b.url  # B holds it now
        # Through any gate: here the old one, which knows where it moved (a balancer might pick either).
        rest = await client.post(b.url + CHAT, content=body, headers={**ALICE, "last-event-id": last_id})
    joined = first[:-1] + events(rest.text)
    fingerprint = KEY.fingerprint(ALICE["authorization"], body)
    offsets = [KEY.verify(i or "", fingerprint=fingerprint, now=0).offset for _, i in joined]
    assert offsets == list(range(1, len(joined) + 1)), "an event was repeated or missing at a seam"
    datas = [d for d, _ in joined]
    assert datas.count("[DONE]") == 1 and sum('"finish_reason":"length"' in d for d in datas) == 1
    assert content(joined) == "".join(token(i) for i in range(60))  # each token once, in order
    continuation = json.loads(engine_b.requests[-1].body)
    assert continuation["messages"][-1]["role"] == "assistant"
    assert len(engine_b.requests) == 1  # the resume was served from what B held, not computed again


async def test_when_the_holder_is_gone_another_gate_finishes_from_the_index(engines: Any, start_gate: StartGate,
                                                                           tmp_path: Path) -> None:
    engine_a, engine_g = await engines(), await engines()
    store = tmp_path / "store"
    a = await resumable_gate(start_gate, engine_a.url, store)  # no peers: a drain cuts what runs
    g = await resumable_gate(start_gate, engine_g.url, store)
    body = chat(stream=True, max_tokens=30, x_token_delay=0.05)
    got = ""
    async with httpx.AsyncClient(timeout=20) as client:
        with anyio.fail_after(20):
            async with client.stream("POST", a.url + CHAT, content=body, headers=ALICE) as response:
                async for chunk in response.aiter_text():
                    got += chunk
                    if got.count("\n\n") == 6:
                        [cut] = a.interrupt_all()
                        assert cut.state is EntryState.CUT
        first = events(got)
        assert json.loads(first[-1][0])["error"]["resumable"] is True
        with anyio.fail_after(10):
            while not list(store.rglob("a-*.json")):
                await anyio.sleep(0.02)
        await a.gate.aclose()  # the holder is gone: its port refuses
        rest = await client.post(g.url + CHAT, content=body, headers={**ALICE, "last-event-id": first[-1][1] or ""})
    assert rest.status_code == 200 and rest.headers["spotguard-resumed"] == "1"
    joined = first[:-1] + events(rest.text)
    fingerprint = KEY.fingerprint(ALICE["authorization"], body)
    assert [KEY.verify(i or "", fingerprint=fingerprint, now=0).offset for _, i in joined] == list(
        range(1, len(joined) + 1))
    assert content(joined) == "".join(token(i) for i in range(30))
    continuation = json.loads(engine_g.requests[-1].body)
    assert continuation["messages"][-1] == {"role": "assistant", "content": content(first[:-1])}
    assert continuation["max_tokens"] == 30 - len([1 for d, _ in first[:-1] if "content" in d and d != "[DONE]"])
    assert g.count("chat", "resumed_from_store") == 1
    assert not list(store.rglob("a-*.json"))  # the entry is forgotten once used


async def test_a_non_streaming_request_handed_over_survives_the_node_that_relayed_it(engines: Any,
                                                                                     start_gate: StartGate) -> None:
    engine_a, engine_b = await engines(), await engines()
    b = await resumable_gate(start_gate, engine_b.url)
    a = await resumable_gate(start_gate, engine_a.url, peers=(b.url,))
    a.gate.apply(DesiredState(generation=1, draining=True, vm_deadline=datetime.now(UTC) + timedelta(seconds=2.0)))
    body = chat(max_tokens=40, x_token_delay=0.05)  # ~2 s on B: A goes away first
    headers = {**ALICE, "x-stainless-retry-count": "0"}
    async with httpx.AsyncClient(timeout=20) as client:
        cut = await client.post(a.url + CHAT, content=body, headers=headers)
        assert cut.status_code == 503 and cut.headers["retry-after"] == "1" and cut.headers["spotguard-resume"]
        # The openai SDK retries the same request (it knows nothing of Spotguard-Resume); a balancer sends it to B.
        retry = await client.post(b.url + CHAT, content=body, headers={**ALICE, "x-stainless-retry-count": "1"})
    assert retry.status_code == 200 and retry.headers["spotguard-resumed"] == "1"
    assert retry.json()["choices"][0]["message"]["content"] == "".join(token(i) for i in range(40))
    assert len(engine_b.requests) == 1 and not engine_a.requests  # computed once, on B
    assert json.loads(engine_b.requests[0].body)["stream"] is True  # asked as a stream: its holder known at once


async def test_a_stream_read_whole_that_ends_without_its_blank_line_is_answered_as_clean_json(
        engines: Any, start_gate: StartGate) -> None:
    # With peers a non-streaming request is read as a stream, and with resume its events are held as they
    # come. The engine's last event has no blank line after it: the gate held it back as unfinished, and it
    # is part of the assembled answer, not extra bytes in front of it.
    async def engine(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive, 1 << 20)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": chat_chunk(0, token(0)) + chat_chunk(1, token(1), "stop")
                    + b"data: [DONE]"})

    async with anyio.create_task_group() as tg:
        url = (await tg.start(serve, engine, nodelay_socket("127.0.0.1", 0))).url
        peer = await engines()
        gw = await resumable_gate(start_gate, url, peers=(peer.url,))
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            first = await client.post(CHAT, json=body)
            second = await client.post(CHAT, json=body)  # the same kept-alive connection: nothing left over on it
        tg.cancel_scope.cancel()
    for answer in (first, second):
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == token(0) + token(1)
