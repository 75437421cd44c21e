"""Triton adapter against a fake Triton: explicit model unload, SIGTERM exit, metrics on their own port."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.errors import EngineError
from spotguard.servers import build_engine
from spotguard.servers.triton import default_metrics_url
from tests.servers.helpers import server_config
from tests.support.engines import StartEngine

pytestmark = pytest.mark.anyio


async def test_explicit_model_control_unloads_without_signal(start_engine: StartEngine) -> None:
    engine = await start_engine("triton", "--models", "llm,embed", "--model-control", "explicit")
    await engine.set_inflight(2, 3)
    async with httpx.AsyncClient() as http:
        config = server_config(kind="triton", url=engine.url, metrics_url=engine.metrics_url,
                               triton_models=["llm", "embed"])
        adapter = build_engine(config, http)
        with anyio.fail_after(20):
            assert adapter.name == "triton"
            assert await adapter.inflight() == 5  # pending count summed over both models' label sets
            infer = f"{engine.url}/v2/models/llm/infer"
            assert (await http.post(infer, json={"inputs": []})).status_code == 200
            assert await adapter.stop_accepting(dry_run=True) == (
                f"would unload llm, embed (POST {engine.url}/v2/repository/models/<model>/unload)")
            assert (await engine.state())["models"] == {"llm": True, "embed": True}
            assert await adapter.stop_accepting(dry_run=False) == "unloaded llm, embed"
            state = await engine.state()
            assert state["models"] == {"llm": False, "embed": False}
            assert state["signals"] == []
            assert engine.proc.poll() is None
            assert (await http.post(infer, json={"inputs": []})).status_code == 400
            # Undrain loads them again and the same server takes work.
            assert await adapter.resume_accepting(dry_run=True) == (
                f"would load llm, embed (POST {engine.url}/v2/repository/models/<model>/load)")
            assert (await engine.state())["models"] == {"llm": False, "embed": False}
            assert await adapter.resume_accepting(dry_run=False) == "loaded llm, embed"
            assert (await engine.state())["models"] == {"llm": True, "embed": True}
            assert (await http.post(infer, json={"inputs": []})).status_code == 200


async def test_unload_refused_without_explicit_mode(start_engine: StartEngine) -> None:
    engine = await start_engine("triton", "--models", "llm", "--model-control", "none")
    async with httpx.AsyncClient() as http:
        config = server_config(kind="triton", url=engine.url, metrics_url=engine.metrics_url,
                               triton_models=["llm", "missing"])
        adapter = build_engine(config, http)
        with anyio.fail_after(10), pytest.raises(EngineError) as caught:
            await adapter.stop_accepting(dry_run=False)
        message = str(caught.value)
        assert "Triton unloaded 0 of 2 models" in message
        assert "unload llm: HTTP 400" in message and "explicit model load / unload is not allowed" in message
        assert "--model-control-mode=explicit" in message


async def test_sigterm_without_models(start_engine: StartEngine) -> None:
    engine = await start_engine("triton", "--models", "llm", "--shutdown-timeout", "30")
    await engine.set_inflight(1, 0)
    async with httpx.AsyncClient() as http:
        config = server_config(kind="triton", url=engine.url, metrics_url=engine.metrics_url, pid=engine.pid)
        adapter = build_engine(config, http)
        with anyio.fail_after(20):
            assert "Triton refuses new requests" in await adapter.stop_accepting(dry_run=False)
            assert await engine.wait_signals(5) == ["SIGTERM"]
            assert (await http.get(f"{engine.url}/v2/health/ready")).status_code == 400
            assert await adapter.inflight() == 1
            await engine.set_inflight(0, 0)
            assert await engine.wait_exit(10) == 0
            assert await adapter.inflight() == 0


def test_default_metrics_port() -> None:
    assert default_metrics_url("http://10.0.0.5:8000") == "http://10.0.0.5:8002/metrics"
    assert default_metrics_url("http://triton.local:8000/base/") == "http://triton.local:8002/metrics"
    assert default_metrics_url("") == ""
