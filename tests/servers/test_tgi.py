"""TGI adapter against a fake TGI process: SIGTERM stops new work, in-flight finishes, then it exits."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.errors import EngineError
from spotguard.servers import build_engine
from tests.servers.helpers import refused, server_config
from tests.support.engines import StartEngine

pytestmark = pytest.mark.anyio


async def test_sigterm_finishes_inflight_then_exits(start_engine: StartEngine) -> None:
    engine = await start_engine("tgi", "--shutdown-timeout", "30")
    await engine.set_inflight(4, 1)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="tgi", url=engine.url, pid_file=str(engine.pid_file)), http)
        with anyio.fail_after(20):
            assert adapter.name == "tgi"
            assert await adapter.inflight() == 5
            assert "TGI stops accepting" in await adapter.stop_accepting(dry_run=False)
            assert await engine.wait_signals(5) == ["SIGTERM"]
            # The router stops accepting connections, its metrics page with it, while in-flight work
            # finishes: the count cannot be read (not "0") until the process has exited.
            await engine.set_inflight(2, 0)
            assert await refused(http, f"{engine.url}/generate")
            with pytest.raises(EngineError, match="engine request failed.*ConnectError"):
                await adapter.inflight()
            assert engine.proc.poll() is None
            await engine.set_inflight(0, 0)
            assert await engine.wait_exit(10) == 0
            assert await adapter.inflight() == 0


async def test_fresh_server_without_gauges(start_engine: StartEngine) -> None:
    engine = await start_engine("tgi")
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="tgi", url=engine.url, pid=engine.pid), http)
        with anyio.fail_after(10):
            # TGI registers gauges on first use: its own other metrics mean "none yet", not an error.
            await engine.serve_raw('tgi_request_count{method="POST"} 0\n')
            assert await adapter.inflight() == 0
            await engine.serve_raw("go_goroutines 12\n")
            with pytest.raises(EngineError, match="none of tgi_batch_current_size, tgi_queue_size found"):
                await adapter.inflight()
