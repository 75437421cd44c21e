"""The gate converges on the state the daemon declares: draining, the VM's deadline, the peers.

An answer a peer continues is relayed until just before the VM's deadline, then ended with a retryable
error; a declaration with an earlier deadline moves that end, the same declaration again (a restarted
daemon) keeps it, and serving again forgets it. Real HTTP on loopback: the gate in front of one fake
engine, a second fake engine as the (slow) peer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

from spotguard.asgi import serve
from spotguard.gate.listen import nodelay_socket
from spotguard.gate.protocol import DesiredState, EntryState, HeldState
from spotguard.gate.proxy import RELAY_END_MARGIN
from tests.support.gate import RunningGate, StartGate
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "max_tokens": 400, "x_hold_after": 2, "x_token_delay": 0.1}
"""Holds on the local engine after 2 tokens (so the drain finds it running); 40 s on the slow peer."""


@pytest.fixture
async def slow_peer() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine()
    engine.release.set()  # the continuation does not hold: it streams a token every 0.1 s
    async with anyio.create_task_group() as tg:
        engine.url = (await tg.start(serve, engine, nodelay_socket("127.0.0.1", 0))).url
        yield engine
        tg.cancel_scope.cancel()


def at(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def migrated_stream(gw: RunningGate, client: httpx.AsyncClient, vm_deadline: datetime,
                          ended: list[tuple[float, str]], task_status: anyio.abc.TaskStatus[None]) -> None:
    """Streams BODY through the gate; once 2 events are in, drains with ``vm_deadline`` and migrates it.
    Records when the stream ended and its last event."""
    async with client.stream("POST", gw.url + CHAT, json=BODY) as response:
        lines = response.aiter_lines()
        events = 0
        async for line in lines:
            if line.startswith("data: "):
                events += 1
                if events == 2:
                    gw.gate.apply(DesiredState(generation=1, draining=True, vm_deadline=vm_deadline))
                    [entry] = gw.interrupt_all()
                    assert entry.state is EntryState.MIGRATED
                    task_status.started()
                last = line
        ended.append((time.time(), last))


async def test_an_earlier_deadline_ends_relayed_answers_before_it(fake_engine: FakeEngine, slow_peer: FakeEngine,
                                                                 start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, peers=(slow_peer.url,))
    ended: list[tuple[float, str]] = []
    async with httpx.AsyncClient(timeout=30) as client, anyio.create_task_group() as tg:
        await tg.start(migrated_stream, gw, client, at(30), ended)
        earlier = at(2.5)
        held = gw.gate.apply(DesiredState(generation=2, draining=True, vm_deadline=earlier))
        assert held.state.vm_deadline == earlier and held.relayed == 1
        with anyio.fail_after(10):  # a hang guard: the assertion below is what the product promises
            while not ended:
                await anyio.sleep(0.02)
    [(when, last)] = ended
    assert when < earlier.timestamp(), "the relayed answer outlived the VM's (new) deadline"
    assert when > earlier.timestamp() - RELAY_END_MARGIN - 1.0  # not before it had to: it ran until then
    error = json.loads(last[6:])["error"]
    assert error["type"] == "interrupted_for_migration" and error["code"] == 503
    assert gw.count("chat", "migration_failed") == 1


async def test_the_same_declaration_again_keeps_the_deadline(fake_engine: FakeEngine, slow_peer: FakeEngine,
                                                             start_gate: StartGate) -> None:
    # What a daemon restarted mid-drain does: it declares again the state rebuilt from its persisted notice.
    gw = await start_gate(fake_engine.url, peers=(slow_peer.url,))
    deadline = at(3.0)
    ended: list[tuple[float, str]] = []
    async with httpx.AsyncClient(timeout=30) as client, anyio.create_task_group() as tg:
        await tg.start(migrated_stream, gw, client, deadline, ended)
        for generation in (1, 2, 3):
            gw.gate.apply(DesiredState(generation=generation, draining=True, vm_deadline=deadline))
        with anyio.fail_after(10):
            while not ended:
                await anyio.sleep(0.02)
    [(when, _)] = ended
    assert when < deadline.timestamp()


async def test_a_new_stream_handed_to_a_peer_ends_with_an_error_event_at_the_deadline(
        fake_engine: FakeEngine, slow_peer: FakeEngine, start_gate: StartGate) -> None:
    # Sent while draining: the peer answers it from its first byte, and the VM's deadline comes first. Its
    # client must see an interrupted answer (it retries), not a clean end that passes a short answer off as
    # whole.
    gw = await start_gate(fake_engine.url, peers=(slow_peer.url,))
    gw.gate.apply(DesiredState(generation=1, draining=True, vm_deadline=at(RELAY_END_MARGIN + 2.0)))
    lines: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(15):
            async with client.stream("POST", gw.url + CHAT, json=BODY) as response:
                assert response.status_code == 200
                lines += [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert len(lines) > 1 and lines[-1] != "data: [DONE]"
    error = json.loads(lines[-1][6:])["error"]
    assert error["type"] == "interrupted_for_migration" and error["code"] == 503
    assert gw.count("chat", "forward_failed") == 1


async def test_serving_again_forgets_a_passed_deadline(fake_engine: FakeEngine, slow_peer: FakeEngine,
                                                       start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url, peers=(slow_peer.url,))
    gw.gate.apply(DesiredState(generation=1, draining=True, vm_deadline=at(0.5)))  # already within the margin
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        refused = await client.post(CHAT, json={**BODY, "stream": False, "max_tokens": 2})
        assert refused.status_code == 503  # past the deadline: nothing new goes to peers either
        gw.gate.apply(DesiredState(generation=2, draining=False))
        fake_engine.release.set()
        assert (await client.post(CHAT, json={**BODY, "stream": False, "max_tokens": 2})).status_code == 200
        gw.gate.apply(DesiredState(generation=3, draining=True, vm_deadline=at(60)))
        handed = await client.post(CHAT, json={**BODY, "stream": False, "max_tokens": 2})
    assert handed.status_code == 200 and gw.count("chat", "forwarded") == 1


async def test_declared_peers_replace_the_configured_ones(fake_engine: FakeEngine, slow_peer: FakeEngine,
                                                          start_gate: StartGate) -> None:
    gw = await start_gate(fake_engine.url)  # no peers configured
    held = gw.gate.apply(DesiredState(generation=1, draining=True, vm_deadline=at(60), peers=(slow_peer.url,)))
    assert held.holds(DesiredState(generation=1, draining=True, vm_deadline=held.state.vm_deadline,
                                   peers=(slow_peer.url,)))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        handed = await client.post(CHAT, json={**BODY, "stream": False, "max_tokens": 2})
    assert handed.status_code == 200 and slow_peer.requests
    # peers = None: the gate keeps what it has.
    held = gw.gate.apply(DesiredState(generation=2, draining=False))
    assert held.state.peers == (slow_peer.url,)


def test_the_wire_form_round_trips_and_refuses_nonsense() -> None:
    from spotguard.errors import GateError

    state = DesiredState(generation=7, draining=True, vm_deadline=at(10), drain_deadline=at(5), peers=("http://p",))
    held = HeldState(state=state, inflight=2, relayed=1)
    back = HeldState.from_wire(json.loads(json.dumps(held.to_wire())))
    assert back.holds(state) and (back.inflight, back.relayed) == (2, 1)
    for bad in ({"generation": -1, "draining": True}, {"generation": 1, "draining": "yes"},
                {"generation": 1, "draining": True, "vm_deadline": "soon"},
                {"generation": 1, "draining": True, "peers": "http://p"}, []):
        with pytest.raises(GateError):
            DesiredState.from_wire(bad)
