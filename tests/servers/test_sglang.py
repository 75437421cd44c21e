"""SGLang adapter against a fake SGLang process: SIGTERM turns /health 503, drains, exits."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.servers import build_engine
from tests.servers.helpers import server_config
from tests.support.engines import StartEngine

pytestmark = pytest.mark.anyio


async def test_sigterm_health_503_drain_exit(start_engine: StartEngine) -> None:
    engine = await start_engine("sglang", "--shutdown-timeout", "30")
    await engine.set_inflight(1, 2)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="sglang", url=engine.url, pid=engine.pid), http)
        with anyio.fail_after(20):
            assert adapter.name == "sglang"
            assert await adapter.inflight() == 3
            assert (await http.get(f"{engine.url}/health")).status_code == 200
            detail = await adapter.stop_accepting(dry_run=False)
            assert detail == (f"sent SIGTERM to pid {engine.pid}; SGLang answers /health with 503 and drains "
                              "running requests")
            assert await engine.wait_signals(5) == ["SIGTERM"]
            assert (await http.get(f"{engine.url}/health")).status_code == 503
            await engine.set_inflight(1, 0)
            assert await adapter.inflight() == 1
            assert engine.proc.poll() is None
            await engine.set_inflight(0, 0)
            assert await engine.wait_exit(10) == 0
            assert await adapter.inflight() == 0


async def test_stop_signal_is_configurable(start_engine: StartEngine) -> None:
    engine = await start_engine("sglang", "--shutdown-timeout", "0")
    async with httpx.AsyncClient() as http:
        config = server_config(kind="sglang", url=engine.url, pid=engine.pid, stop_signal="INT")
        adapter = build_engine(config, http)
        with anyio.fail_after(10):
            assert (await adapter.stop_accepting(dry_run=False)).startswith(f"sent SIGINT to pid {engine.pid}")
            assert await engine.wait_exit(5) == 0
