"""llama.cpp adapter: never signals llama-server, switches the gate, counts busy /slots entries."""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import httpx
import pytest

from spotguard.errors import EngineError
from spotguard.servers import build_engine
from tests.servers.helpers import server_config
from tests.support.engines import StartEngine
from tests.support.llama import LlamaServer

pytestmark = pytest.mark.anyio


async def test_never_signalled_and_left_serving(start_engine: StartEngine) -> None:
    engine = await start_engine("llamacpp", "--slots", "4")
    await engine.set_inflight(3)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="llamacpp", url=engine.url, pid=engine.pid), http)
        with anyio.fail_after(10):
            assert adapter.name == "llamacpp"
            assert await adapter.inflight() == 3
            assert "would leave it serving" in await adapter.stop_accepting(dry_run=True)
            detail = await adapter.stop_accepting(dry_run=False)
            assert detail.startswith("llama-server not signalled (SIGTERM would abort running requests)")
            # The server was left alone: still running, no signal, its slots still busy and countable.
            state = await engine.state()
            assert state["signals"] == [] and not state["draining"]
            assert engine.proc.poll() is None
            assert await adapter.inflight() == 3
            # Nothing to restart on undrain: the server never stopped (the gate is reopened by undrain).
            assert "nothing to restart" in await adapter.resume_accepting(dry_run=False)
            assert (await engine.state())["signals"] == [] and engine.proc.poll() is None


@pytest.mark.parametrize(("body", "message"), [
    ("not json", "not JSON"),
    ('{"slots": []}', "expected a JSON list of slots, got dict"),
    ("[1, 2]", "a slot is int, not an object"),
    ('[{"id": 0, "n_ctx": 4096}]', "slot 0 has no is_processing flag"),
])
async def test_malformed_slots(start_engine: StartEngine, body: str, message: str) -> None:
    engine = await start_engine("llamacpp")
    await engine.serve_raw(body)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="llamacpp", url=engine.url), http)
        with anyio.fail_after(10), pytest.raises(EngineError, match=message):
            await adapter.inflight()


async def test_older_state_field_and_disabled_slots(start_engine: StartEngine) -> None:
    engine = await start_engine("llamacpp")
    await engine.serve_raw(json.dumps([{"id": 0, "state": 1}, {"id": 1, "state": 0}, {"id": 2, "state": 1}]))
    disabled = await start_engine("llamacpp", "--no-slots")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            assert await build_engine(server_config(kind="llamacpp", url=engine.url), http).inflight() == 2
            with pytest.raises(EngineError, match="slots endpoint is off"):
                await build_engine(server_config(kind="llamacpp", url=disabled.url), http).inflight()


async def test_hung_slots_fail_within_the_timeout(start_engine: StartEngine) -> None:
    engine = await start_engine("llamacpp")
    await engine.hang()
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="llamacpp", url=engine.url, timeout=0.5), http)
        with anyio.fail_after(5), pytest.raises(EngineError, match="no answer within 0.5s"):
            await adapter.inflight()


@pytest.mark.llama
async def test_real_llama_server_slots(llama_server_factory: Callable[..., LlamaServer]) -> None:
    server = llama_server_factory(slots=2, ctx=8192)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="llamacpp", url=server.url), http)
        with anyio.fail_after(60):
            assert await adapter.inflight() == 0
            async with anyio.create_task_group() as tg:
                async def generate() -> None:
                    body = {"prompt": "Once upon a time", "n_predict": 4000, "stream": True, "ignore_eos": True}
                    async with http.stream("POST", f"{server.url}/completion", json=body, timeout=60) as response:
                        async for _ in response.aiter_bytes():
                            pass

                tg.start_soon(generate)
                tg.start_soon(generate)
                while await adapter.inflight() != 2:  # both slots busy
                    await anyio.sleep(0.01)
                assert "not signalled" in await adapter.stop_accepting(dry_run=False)
                # Closing the stream frees the slot (FACTS.md: ~50 ms).
                tg.cancel_scope.cancel()
            while await adapter.inflight() != 0:
                await anyio.sleep(0.02)
            assert server.proc.poll() is None
            assert (await http.get(f"{server.url}/health")).status_code == 200
