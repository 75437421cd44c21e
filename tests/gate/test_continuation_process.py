"""The gate process migrating a request whose counts are not plain integers: the engine may read ``n: 2.0`` as
two choices and ``max_tokens: 10.0`` as a limit the gate did not reduce, so the peer would have produced
several choices or the whole budget again. Such a request ends with a retryable error instead."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.asgi import serve
from spotguard.gate.control import call
from spotguard.gate.listen import nodelay_socket
from tests.support._gate_process import gate_process
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("odd", [{"n": 2.0}, {"max_tokens": 10.0}, {"max_tokens": "10"}, {"best_of": True}],
                         ids=["n 2.0", "max_tokens 10.0", "max_tokens '10'", "best_of true"])
async def test_a_request_with_counts_that_are_not_integers_is_not_migrated(fake_engine: FakeEngine, tmp_path: Path,
                                                                           odd: dict[str, object]) -> None:
    peer = FakeEngine()
    peer.release.set()  # a continuation would stream at once there (the x_ knobs travel with the body)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10,
            "x_hold_after": 1, **odd}
    events: list[str] = []
    async with anyio.create_task_group() as tg:
        peer.url = (await tg.start(serve, peer, nodelay_socket("127.0.0.1", 0))).url
        with gate_process(tmp_path, fake_engine.url, f'peers = ["{peer.url}"]') as gate:
            async with httpx.AsyncClient(timeout=30) as http:
                with anyio.fail_after(40):
                    async with http.stream("POST", gate.url + CHAT, content=json.dumps(body)) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            if line.startswith("data: "):
                                events.append(line[6:])
                                if len(events) == 1:  # the first token is out: the eviction comes
                                    await call(gate.control, "draining", timeout=5, on=True, deadline=None)
                                    cut = await call(gate.control, "interrupt", timeout=10, seconds=5)
                                    assert len(cut["requests"]) == 1
                    not_continuable = await gate.request_count("chat", "not_continuable")
        tg.cancel_scope.cancel()
    assert events[-1] != "[DONE]", f"continued on the peer: {events}"
    assert json.loads(events[-1])["error"]["type"] == "interrupted_for_migration", events
    assert not [r for r in peer.requests if r.path == CHAT]  # nothing went to the peer
    assert not_continuable == 1
