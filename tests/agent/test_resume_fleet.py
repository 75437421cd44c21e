"""Resume on a small fleet of real processes: three nodes (a vLLM-like engine, `spotguard run` and its gate)
behind HAProxy (health checks on /readyz), sharing a file:// store and the resume key, each gate's peer the
balancer - the docs' simplest setup. An answer the evicted node cannot finish is finished by the fleet:

- a non-streaming request sent by the openai SDK itself, whose node goes away mid-answer: the SDK's own retry
  gets the whole answer, generated once;
- a stream read through ``spotguard.client``, whose new holder is SIGKILLed too: resumed from the index
  on the third node, every token once;
- a cursor sent with another Authorization is refused.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from openai import AsyncOpenAI

from bench._fleet_nodes import (
    Balancer,
    EngineProcess,
    Health,
    Node,
    haproxy_binary,
    start_balancer,
    start_engine,
    start_spotguard_node,
)
from bench._vllm_like import expected_text
from spotguard.client import resumable_async_http_client
from spotguard.control import client as control
from spotguard.demo.processes import Processes, free_port

pytestmark = [pytest.mark.anyio]
RATE = 100.0
"""Tokens per second of each engine."""


@dataclass
class Fleet:
    nodes: list[Node]
    balancer: Balancer
    engines: list[EngineProcess]

    async def only(self, name: str) -> None:
        """New requests go to ``name`` alone (the others weighted out), until ``everyone``."""
        for node in self.nodes:
            await self.balancer.set_weight(node.name, 1 if node.name == name else 0)

    async def everyone(self) -> None:
        for node in self.nodes:
            await self.balancer.set_weight(node.name, 1)

    def generated(self) -> int:
        return sum(engine.generated() for engine in self.engines)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    try:
        haproxy_binary()
    except RuntimeError as exc:  # installed by `make tools` (tools/setup-bench-tools.sh)
        pytest.skip(str(exc))
    procs = Processes(logs=tmp_path)
    try:
        store = tmp_path / "store"
        lb_port = free_port()
        lb_url = f"http://127.0.0.1:{lb_port}"
        with anyio.fail_after(120):  # three daemons and engines starting on a busy 2-core machine
            engines = [await start_engine(procs, tmp_path, f"engine{i}", tokens_per_s=RATE, shutdown_timeout=60)
                       for i in range(3)]
            nodes = [await start_spotguard_node(procs, tmp_path, f"node{i}", engines[i], lb_url=lb_url, store=store,
                                                safety_margin=1.0) for i in range(3)]
            balancer = await start_balancer(procs, tmp_path, lb_port, nodes, Health(inter_s=0.3, fall=2, rise=1))
        yield Fleet(nodes, balancer, engines)
    finally:
        procs.stop_all()


async def evict(node: Node, seconds: float) -> Callable[[], Awaitable[None]]:
    """A spot notice with ``seconds`` left (a manual drain, as a 30 s GCP window would be); returns what
    ends the VM at its deadline (every process of the node SIGKILLed)."""
    answer = await control.drain(node.control_socket, reason="test eviction", deadline_seconds=seconds)
    assert answer.get("accepted"), answer
    deadline = anyio.current_time() + seconds

    async def gone() -> None:
        await anyio.sleep_until(deadline)
        node.kill()

    return gone


async def test_the_sdks_own_retry_gets_an_answer_its_node_could_not_finish(fleet: Fleet) -> None:
    a = fleet.nodes[0]
    tokens = 400  # 4 s at 100 tokens/s: outlasts a 3 s window
    messages = [{"role": "user", "content": "count"}]
    async with AsyncOpenAI(base_url=fleet.balancer.url + "/v1", api_key="sk-alice", timeout=60) as sdk:
        await fleet.only(a.name)
        async with anyio.create_task_group() as tg:
            answers: list[str] = []

            async def ask() -> None:
                done = await sdk.chat.completions.create(model="m", messages=messages, max_tokens=tokens)  # type: ignore[arg-type]
                answers.append(done.choices[0].message.content or "")

            tg.start_soon(ask)
            with anyio.fail_after(30):
                while not fleet.engines[0].generated():
                    await anyio.sleep(0.02)
            await fleet.everyone()
            end = await evict(a, 3.0)
            tg.start_soon(end)
        # The SDK saw a 503 (Retry-After: 1) from the node going away, retried through the balancer, and got the
        # answer another node had been finishing meanwhile.
    assert answers == [expected_text(tokens)]
    assert tokens <= fleet.generated() <= tokens + 10  # generated once (a few tokens cut in flight at most)


async def test_a_stream_survives_its_node_and_its_new_holder(fleet: Fleet) -> None:
    a = fleet.nodes[0]
    tokens = 600
    received = ""
    async with AsyncOpenAI(base_url=fleet.balancer.url + "/v1", api_key="sk-alice", timeout=60,
                           http_client=resumable_async_http_client(timeout=60)) as sdk:
        await fleet.only(a.name)
        with anyio.fail_after(60):
            stream = await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "count"}], max_tokens=tokens, stream=True)
            async with anyio.create_task_group() as tg:
                killed_holder = False
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        received += chunk.choices[0].delta.content
                    words = received.count("w")
                    if words == 20:
                        await fleet.everyone()
                        tg.start_soon(await evict(a, 5.0))
                    if words == 150 and not killed_holder:
                        # The node now continuing the answer dies as well (whichever took it).
                        holder = max(fleet.nodes[1:], key=lambda n: n.engine.generated())
                        holder.kill()
                        killed_holder = True
    assert killed_holder and received == expected_text(tokens)
    assert fleet.generated() <= tokens + 20
    # The third node finished it from the index: the holder's part was gone with it.
    survivor = next(n for n in fleet.nodes[1:] if n.daemon is not None and n.daemon.poll() is None)
    async with httpx.AsyncClient(timeout=10) as http:
        with anyio.fail_after(10):  # the daemon mirrors its gate's counts once a second
            while 'result="resumed_from_store"} 1.0' not in (await http.get(survivor.daemon_url + "/metrics")).text:
                await anyio.sleep(0.1)
        # The index lookup that found it is counted where an operator reads it: the daemon's /metrics.
        metrics = (await http.get(survivor.daemon_url + "/metrics")).text
    assert 'spotguard_resume_index_total{op="lookup",result="found"}' in metrics


async def test_a_cursor_works_only_with_its_own_authorization(fleet: Fleet) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "count"}], "max_tokens": 5, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        first = await http.post(fleet.balancer.url + "/v1/chat/completions", json=body,
                                headers={"authorization": "Bearer sk-alice"})
        ids = [line[4:] for line in first.text.splitlines() if line.startswith("id: ")]
        assert len(ids) >= 5
        mallory = await http.post(fleet.balancer.url + "/v1/chat/completions", json=body,
                                  headers={"authorization": "Bearer sk-mallory", "last-event-id": ids[1]})
        alice = await http.post(fleet.balancer.url + "/v1/chat/completions", json=body,
                                headers={"authorization": "Bearer sk-alice", "last-event-id": ids[1]})
    assert mallory.status_code == 409 and json.loads(mallory.text)["error"]["type"] == "resume_refused"
    assert alice.status_code == 200 and alice.headers["spotguard-resumed"] == "1"
    # Exactly what came after the second event the first time, and nothing before it.
    assert _text(alice.text) == _text(first.text.split("\n\n", 2)[2])


def _text(sse: str) -> str:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
