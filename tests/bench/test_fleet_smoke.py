"""bench/fleet.py's stand-in engine, as a real process over real HTTP: its answers are the deterministic
``w0 w1 ...`` the bench checks clients against, a continuation carries on exactly where the output it is
given stops, and SIGTERM drains as ``vllm serve --shutdown-timeout`` does. (The bench itself never runs
in the test suite.)"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from openai import AsyncOpenAI

from bench._fleet_nodes import EngineProcess, start_engine
from bench._vllm_like import expected_text
from spotguard.demo.processes import Processes

pytestmark = pytest.mark.anyio
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Count for me, please."}]


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[Callable[..., Awaitable[EngineProcess]]]:
    """Starts the engine the way bench/fleet.py does (a process of its own, waited for on /health)."""
    procs = Processes(logs=tmp_path)

    async def start(*, rate: float = 2000.0, shutdown_timeout: float = 30.0) -> EngineProcess:
        with anyio.fail_after(90):  # Python start-up on a busy 2-core machine
            return await start_engine(procs, tmp_path, f"engine{len(procs.children)}", tokens_per_s=rate,
                                      shutdown_timeout=shutdown_timeout)

    yield start
    procs.stop_all()


async def _sse(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
    async with http.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                yield "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])


async def test_answers_are_the_deterministic_count_streamed_or_not(engine_factory: Callable[..., Awaitable[EngineProcess]]) -> None:
    engine = await engine_factory()
    async with httpx.AsyncClient(timeout=10) as http:
        events = [e async for e in _sse(http, engine.url + CHAT, {"messages": USER, "max_tokens": 7, "stream": True,
                                                                  "stream_options": {"include_usage": True}})]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                       if isinstance(e, dict) and e["choices"])
        assert text == expected_text(7) == "w0 w1 w2 w3 w4 w5 w6 "
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 7  # type: ignore[index]
        assert [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e["choices"]][-1] == "length"
        whole = (await http.post(engine.url + COMPLETIONS, json={"prompt": "Count.", "max_tokens": 5})).json()
        assert whole["choices"][0] == {"index": 0, "text": expected_text(5), "logprobs": None, "finish_reason": "length"}
    assert engine.generated() == 12
    # the openai SDK reads the same thing
    async with AsyncOpenAI(base_url=engine.url + "/v1", api_key="test") as sdk:
        stream = await sdk.completions.create(model="m", prompt="Count.", max_tokens=4, stream=True)
        assert "".join([chunk.choices[0].text async for chunk in stream]) == expected_text(4)


async def test_a_continuation_carries_on_where_the_output_stops(engine_factory: Callable[..., Awaitable[EngineProcess]]) -> None:
    engine = await engine_factory()
    async with httpx.AsyncClient(timeout=10) as http:
        so_far = expected_text(3)
        chat = {"messages": [*USER, {"role": "assistant", "content": so_far}], "max_tokens": 4,
                "continue_final_message": True, "add_generation_prompt": False}
        rest = (await http.post(engine.url + CHAT, json=chat)).json()["choices"][0]["message"]["content"]
        assert so_far + rest == expected_text(7)
        completion = (await http.post(engine.url + COMPLETIONS,
                                      json={"prompt": "Count. " + so_far, "max_tokens": 2})).json()
        assert so_far + completion["choices"][0]["text"] == expected_text(5)
        # as vLLM: continuing needs add_generation_prompt off; without continue_final_message a new turn starts
        refused = await http.post(engine.url + CHAT, json={**chat, "add_generation_prompt": True})
        assert refused.status_code == 400 and "add_generation_prompt" in refused.json()["error"]["message"]
        fresh = {k: v for k, v in chat.items() if k != "continue_final_message"}
        assert (await http.post(engine.url + CHAT, json=fresh)).json()["choices"][0]["message"]["content"] == \
            expected_text(4)


async def test_sigterm_refuses_new_work_finishes_running_work_then_exits(engine_factory: Callable[..., Awaitable[EngineProcess]]) -> None:
    engine = await engine_factory(rate=100.0, shutdown_timeout=30.0)
    got: list[str] = []
    async with httpx.AsyncClient(timeout=10) as http:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                first = anyio.Event()

                async def read() -> None:
                    async for event in _sse(http, engine.url + COMPLETIONS,
                                            {"prompt": "Count.", "max_tokens": 100, "stream": True}):
                        if isinstance(event, dict):
                            got.append(event["choices"][0]["text"])
                            first.set()

                tg.start_soon(read)
                await first.wait()
                engine.proc.send_signal(signal.SIGTERM)
                answered = 0  # new requests that came before the signal landed (one token each)
                while (await http.post(engine.url + COMPLETIONS,
                                       json={"prompt": "x", "max_tokens": 1})).status_code != 503:
                    answered += 1
                assert (await http.get(engine.url + "/health")).status_code == 200  # as vLLM's, while draining
        assert "".join(got) == expected_text(100)  # the running answer finished whole
    with anyio.fail_after(10):
        while engine.proc.poll() is None:
            await anyio.sleep(0.05)
    assert engine.proc.returncode == 0 and engine.generated() == 100 + answered


async def test_what_outlasts_the_shutdown_timeout_is_cut_and_its_tokens_still_counted(engine_factory: Callable[..., Awaitable[EngineProcess]]) -> None:
    engine = await engine_factory(rate=50.0, shutdown_timeout=0.5)
    got: list[str] = []
    async with httpx.AsyncClient(timeout=10) as http:
        with anyio.fail_after(30), pytest.raises(httpx.RemoteProtocolError):
            async for event in _sse(http, engine.url + CHAT, {"messages": USER, "max_tokens": 1000, "stream": True}):
                if isinstance(event, dict) and event["choices"][0]["delta"].get("content"):
                    got.append(event["choices"][0]["delta"]["content"])
                    if len(got) == 5:
                        engine.proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(10):
        while engine.proc.poll() is None:
            await anyio.sleep(0.05)
    assert 5 < len(got) < 1000 and "".join(got) == expected_text(len(got))
    assert engine.generated() >= len(got)  # what was cut was generated all the same
