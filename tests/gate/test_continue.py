"""What makes an answer continuable anywhere: a non-streaming request is read as a stream (its output so far
is known), a migrated one is finished by a peer without being generated again, and a peer that is a load
balancer routing work back to this draining node is tried again rather than passed over.

Real HTTP on loopback: the gate in front of a fake engine, a second fake engine (or a small balancer
stand-in) as the peer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

from spotguard.asgi import Receive, Scope, Send, read_body, serve
from spotguard.gate.listen import nodelay_socket
from spotguard.gate.protocol import DesiredState, EntryState
from tests.support.gate import StartGate, gate_garbage
from tests.support.openai_upstream import FakeEngine, token

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture
async def peer() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine()
    engine.release.set()
    async with anyio.create_task_group() as tg:
        engine.url = (await tg.start(serve, engine, nodelay_socket("127.0.0.1", 0))).url
        yield engine
        tg.cancel_scope.cancel()


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def test_a_non_streaming_answer_is_read_as_a_stream_and_answered_whole(fake_engine: FakeEngine, peer: FakeEngine,
                                                                           start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, peers=(peer.url,))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "x_hold_after": 3}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client, anyio.create_task_group() as tg:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await client.post(CHAT, json=body))

        tg.start_soon(ask)
        await wait_for(lambda: fake_engine.holding == 1)
        [entry] = gw.entries()
        assert entry.output == token(0) + token(1) + token(2)  # known before the answer is complete
        assert json.loads(entry.body) == body  # the record keeps what the client sent
        fake_engine.release.set()
        await wait_for(lambda: bool(answers))
    sent = json.loads(fake_engine.requests[-1].body)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    [answer] = answers
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    doc = answer.json()
    assert doc["object"] == "chat.completion" and doc["id"] == "chatcmpl-1" and doc["model"] == "fake-model"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "".join(token(i) for i in range(5))}
    assert doc["choices"][0]["finish_reason"] == "length"
    assert gw.count("chat", "ok") == 1


async def test_requests_a_stream_cannot_carry_go_to_the_engine_unchanged(fake_engine: FakeEngine, peer: FakeEngine,
                                                                        start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, peers=(peer.url,))
    fake_engine.release.set()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for extra in ({"n": 2}, {"logprobs": True}, {"tools": [{"type": "function"}]}, {"echo": True}):
            raw = json.dumps({"model": "m", "prompt": "p", "max_tokens": 2, **extra}).encode()
            assert (await client.post(COMPLETIONS, content=raw)).status_code == 200
            assert fake_engine.requests[-1].body == raw


async def test_a_migrated_non_streaming_answer_is_finished_not_generated_again(fake_engine: FakeEngine,
                                                                              peer: FakeEngine,
                                                                              start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, peers=(peer.url,), engine_kind="vllm")
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "x_hold_after": 3}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client, anyio.create_task_group() as tg:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await client.post(CHAT, json=body))

        tg.start_soon(ask)
        await wait_for(lambda: fake_engine.holding == 1)
        gw.gate.apply(DesiredState(generation=1, draining=True))
        [moved] = gw.interrupt_all()
        assert moved.state is EntryState.MIGRATED and moved.output == token(0) + token(1) + token(2)
        await wait_for(lambda: bool(answers))
    continuation = json.loads(peer.requests[-1].body)
    assert continuation["messages"][-1] == {"role": "assistant", "content": token(0) + token(1) + token(2)}
    assert continuation["max_tokens"] == 5 and continuation["stream"] is True  # only what is left
    assert continuation["continue_final_message"] is True
    [answer] = answers
    doc = answer.json()
    assert answer.status_code == 200 and doc["id"] == "chatcmpl-1"
    # The local part, then what the peer added: the uninterrupted answer, each token once.
    assert doc["choices"][0]["message"]["content"] == "".join(token(i) for i in range(8))
    assert gw.count("chat", "migrated") == 1


async def test_a_malformed_event_in_the_peers_continuation_ends_the_answer_as_interrupted(
        fake_engine: FakeEngine, peer: FakeEngine, start_gate: StartGate) -> None:
    # The peer's second event is not JSON: what follows it cannot be joined, so the client must not get a
    # [DONE] that passes a short answer off as whole, but an error it can retry on.
    gw = await start_gate(fake_engine.url, peers=(peer.url,), engine_kind="vllm")
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
            "x_hold_after": 3, "x_malformed": "sse"}
    lines: list[str] = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client, anyio.create_task_group() as tg:

        async def ask() -> None:
            async with client.stream("POST", CHAT, json=body) as response:
                lines.extend([line async for line in response.aiter_lines() if line.startswith("data: ")])

        tg.start_soon(ask)
        await wait_for(lambda: fake_engine.holding == 1)
        gw.gate.apply(DesiredState(generation=1, draining=True))
        [moved] = gw.interrupt_all()
        assert moved.state is EntryState.MIGRATED
        await wait_for(lambda: bool(lines))
    assert peer.requests and "data: [DONE]" not in lines
    error = json.loads(lines[-1][6:])["error"]
    assert error["type"] == "interrupted_for_migration" and error["code"] == 503
    assert gw.count("chat", "migration_failed") == 1


class Balancer:
    """A load balancer stand-in: the first ``bounce`` requests come back "draining" (routed to the node that
    forwarded them), the rest reach the engine behind it."""

    def __init__(self, engine: FakeEngine, bounce: int) -> None:
        self.engine = engine
        self.bounce = bounce
        self.seen = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.seen += 1
        if self.seen <= self.bounce:
            await read_body(receive, 1 << 20)
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                                    (b"spotguard-dropped-reason", b"draining")]})
            await send({"type": "http.response.body", "body": b'{"error":{"type":"unavailable"}}'})
            return
        await self.engine(scope, receive, send)


@pytest.mark.parametrize("bounce, served", [(2, True), (9, False)])
async def test_a_balancer_that_routes_work_back_here_is_tried_again(fake_engine: FakeEngine, peer: FakeEngine,
                                                                    start_gate: StartGate, bounce: int,
                                                                    served: bool) -> None:
    balancer = Balancer(peer, bounce)
    async with anyio.create_task_group() as tg:
        url = (await tg.start(serve, balancer, nodelay_socket("127.0.0.1", 0))).url
        gw = await start_gate(fake_engine.url, peers=(url,))
        gw.gate.apply(DesiredState(generation=1, draining=True))
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            answer = await client.post(CHAT, json={"model": "m", "messages": [], "max_tokens": 2})
        tg.cancel_scope.cancel()
    if served:
        assert answer.status_code == 200 and balancer.seen == bounce + 1
    else:  # a few tries, then passed over: the client is told to retry (never an endless loop)
        assert answer.status_code == 503 and balancer.seen == 4


async def test_at_a_drain_only_answers_that_will_not_finish_here_are_handed_over(fake_engine: FakeEngine,
                                                                                peer: FakeEngine,
                                                                                start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, peers=(peer.url,))
    fake_engine.release.set()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    bodies = {"short": {**chat, "max_tokens": 40, "x_token_delay": 0.01},  # ~0.4 s: finishes in the window
              "long": {**chat, "max_tokens": 60, "x_token_delay": 0.04},   # ~2.4 s: cannot
              "unbounded": {**chat, "x_token_delay": 0.04}}                # no limit: cannot be told
    ends: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client, anyio.create_task_group() as tg:
        async def stream(name: str) -> None:
            async with client.stream("POST", CHAT, json=bodies[name]) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        ends[name] = line

        for name in bodies:
            tg.start_soon(stream, name)
        await wait_for(lambda: len(gw.entries()) == 3 and all(e.tokens >= 5 for e in gw.entries()))
        gw.gate.apply(DesiredState(generation=1, draining=True, drain_deadline=at(1.5)))
        await wait_for(lambda: sum(e.state is EntryState.MIGRATED for e in gw.entries()) == 2, timeout=3)
        by_state = {json.loads(e.body).get("max_tokens"): e.state for e in gw.entries()}
        assert by_state == {40: EntryState.RUNNING, 60: EntryState.MIGRATED, None: EntryState.MIGRATED}
    assert all(end == "data: [DONE]" for end in ends.values()), ends
    assert gw.count("chat", "ok") == 1 and gw.count("chat", "migrated") == 2


def at(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_handing_over_leaves_nothing_to_the_cyclic_garbage_collector(fake_engine: FakeEngine, peer: FakeEngine,
                                                                           start_gate: StartGate) -> None:
    """At a drain every request goes through a peer relay: a running stream handed over, a new request sent on."""
    gw = await start_gate(fake_engine.url, peers=(peer.url,))
    fake_engine.release.set()
    long = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 60,
            "x_token_delay": 0.02}
    ends: list[str] = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        with anyio.fail_after(20):
            assert (await client.post(CHAT, json={**long, "max_tokens": 2, "x_token_delay": 0})).status_code == 200
            with gate_garbage() as left:
                async with anyio.create_task_group() as tg:
                    async def stream() -> None:
                        async with client.stream("POST", CHAT, json=long) as response:
                            ends.extend([line async for line in response.aiter_lines() if line.startswith("data: ")])

                    tg.start_soon(stream)
                    await wait_for(lambda: any(e.tokens >= 5 for e in gw.entries()))
                    gw.gate.apply(DesiredState(generation=1, draining=True, drain_deadline=at(0.5)))
                    await wait_for(lambda: any(e.state is EntryState.MIGRATED for e in gw.entries()))
                    handed = await client.post(CHAT, json={"model": "m", "messages": [], "max_tokens": 2})
    assert handed.status_code == 200 and ends[-1] == "data: [DONE]"
    assert gw.count("chat", "migrated") == 1
    assert left == set()
