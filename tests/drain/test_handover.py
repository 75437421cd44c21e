"""A drain with peers: what is still running when the wait ends is handed to a peer, and the timeline, the
drain's result and the end webhook say so, not that the drain failed (nobody is paged for a drain that lost
nothing).

The node's gate is the real one (served in this process, tests/support/gate.py) in front of a fake OpenAI
engine; the peer is a second fake engine; the webhooks go to a real loopback receiver.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from spotguard.drain import DrainEngine, plan
from tests.drain.support import FakeEngine, Receiver, config, context, notice, receivers, services
from tests.support.gate import StartGate
from tests.support.openai_upstream import FakeEngine as FakeOpenAI
from tests.support.openai_upstream import stream_chat

pytestmark = pytest.mark.anyio


async def test_a_drain_that_hands_a_request_to_a_peer_is_ok_and_says_so(
        fake_engine: FakeOpenAI, peer_engine: FakeOpenAI, start_gate: StartGate) -> None:
    gate = await start_gate(fake_engine.url, peers=(peer_engine.url,))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 300,
            "x_token_delay": 0.01}
    events: list[Any] = []
    first = anyio.Event()
    async with httpx.AsyncClient(timeout=30) as http, anyio.create_task_group() as tg:
        tg.start_soon(stream_chat, http, gate.url + "/v1/chat/completions", body, events, first)
        with anyio.fail_after(10):
            await first.wait()
        async with receivers(Receiver()) as (hook,):
            cfg = config(urls=[hook.url], wait_inflight_budget=0.5).replace("gate", peers=[peer_engine.url])
            ctx = context(cfg, notice(seconds=30), services(FakeEngine(), journal=gate.gate.journal), http)
            with anyio.fail_after(20):
                timeline = await DrainEngine(plan(cfg), ctx, background=()).run()
        with anyio.fail_after(20):  # the peer's answer is relayed to its end
            while not events or events[-1] != "[DONE]":
                await anyio.sleep(0.02)
    wait, migrate = timeline.step("wait_inflight"), timeline.step("migrate")
    assert wait.outcome == "handed_over" and "handed to migrate" in wait.detail, wait
    assert migrate.outcome == "ok" and migrate.handed_over == 1, migrate
    assert timeline.result == "handed_over" and timeline.summary() == "ok, with 1 request handed to peers"
    assert ctx.metrics.drains.labels(source="aws", result="handed_over")._value.get() == 1
    end = hook.deliveries[-1].body["text"]
    assert "(drained, 1 request handed to peers)" in end and "error" not in end, end
    assert "wait_inflight handed_over" in end and "migrate ok" in end
    assert not any(isinstance(e, dict) and "error" in e for e in events)
