"""vLLM adapter against a fake vLLM process that drains on a real SIGTERM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.errors import EngineError, ManualActionRequired
from spotguard.servers import build_engine
from tests.servers.helpers import refused, server_config
from tests.support.engines import FAKE_ENGINE, StartEngine

pytestmark = pytest.mark.anyio


async def test_sigterm_drains_then_exits(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm", "--shutdown-timeout", "30")
    await engine.set_inflight(2, 1)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, pid_file=str(engine.pid_file)), http)
        with anyio.fail_after(20):
            assert adapter.name == "vllm"
            assert await adapter.inflight() == 3
            detail = await adapter.stop_accepting(dry_run=False)
            assert f"sent SIGTERM to pid {engine.pid}" in detail
            assert await engine.wait_signals(5) == ["SIGTERM"]
            # Draining as vLLM does: its HTTP server goes away at once (new connections refused, /metrics
            # with them) while running work finishes. The count is unknown then, not 0: the process lives.
            assert await refused(http, f"{engine.url}/v1/completions")
            with pytest.raises(EngineError, match="engine request failed.*ConnectError"):
                await adapter.inflight()
            assert engine.proc.poll() is None
            await engine.set_inflight(0, 0)
            assert await engine.wait_exit(10) == 0
            # The engine is gone with its metrics page: nothing is in flight any more.
            assert await adapter.inflight() == 0


async def test_undrain_starts_the_unit_spotguard_stopped(start_engine: StartEngine, systemctl: Path,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine = await start_engine("vllm", "--shutdown-timeout", "30")
    (systemctl / "mainpid").write_text(str(engine.pid))
    port = httpx.URL(engine.url).port
    ready = tmp_path / "restarted.ready"
    # What the unit's ExecStart runs: the same engine on the same port.
    monkeypatch.setenv("STUB_START", json.dumps([sys.executable, str(FAKE_ENGINE), "vllm", str(port),
                                                 "--ready-file", str(ready)]))
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, unit="vllm.service"), http)
        with anyio.fail_after(30):
            await adapter.stop_accepting(dry_run=False)
            assert await engine.wait_exit(10) == 0
            assert await refused(http, f"{engine.url}/v1/completions")
            assert await adapter.resume_accepting(dry_run=True) == "would run start --no-block vllm.service"
            assert await adapter.resume_accepting(dry_run=False) == "queued systemctl start vllm.service"
            while not ready.exists():
                await anyio.sleep(0.02)
            assert (await http.get(f"{engine.url}/health")).status_code == 200
            assert (await http.post(f"{engine.url}/v1/completions", json={"prompt": "x"})).status_code == 200
            assert await adapter.inflight() == 0


async def test_undrain_of_a_pid_file_engine_needs_a_person(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm", "--shutdown-timeout", "30")
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, pid_file=str(engine.pid_file)), http)
        with anyio.fail_after(20):
            await adapter.stop_accepting(dry_run=False)
            assert await engine.wait_exit(10) == 0
            with pytest.raises(ManualActionRequired, match=f"pid file {engine.pid_file}.*restart the engine by hand"):
                await adapter.resume_accepting(dry_run=False)


async def test_dry_run_signals_nothing(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm")
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, pid=engine.pid), http)
        with anyio.fail_after(10):
            assert await adapter.stop_accepting(dry_run=True) == (
                f"would send SIGTERM to pid {engine.pid}; vLLM rejects new requests and finishes running ones "
                "within its --shutdown-timeout (0 = aborts them)")
            assert (await engine.state())["signals"] == []
            assert (await http.post(f"{engine.url}/v1/completions", json={"prompt": "x"})).status_code == 200


async def test_hung_metrics_fail_within_the_timeout(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm")
    await engine.hang()
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, pid=engine.pid, timeout=0.5), http)
        # Cut at its 0.5 s timeout (the error says so); fail_after(5) only guards against a hang.
        with anyio.fail_after(5), pytest.raises(EngineError, match="no answer within 0.5s"):
            await adapter.inflight()


@pytest.mark.parametrize(("text", "message"), [
    ("this is {not prometheus\n", "not Prometheus text"),
    ('vllm:num_requests_running{model_name="a"} NaN\n', "is nan, not a count"),
    ('vllm:num_requests_running{model_name="a"} -1\n', "is -1.0, not a count"),
    ("process_cpu_seconds_total 12\n", "none of vllm:num_requests_running, vllm:num_requests_waiting found"),
    ("<html><body>login</body></html>\n", "not Prometheus text"),
])
async def test_malformed_metrics_are_engine_errors(start_engine: StartEngine, text: str, message: str) -> None:
    engine = await start_engine("vllm")
    await engine.serve_raw(text)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, pid=engine.pid), http)
        with anyio.fail_after(10), pytest.raises(EngineError, match=message):
            await adapter.inflight()


async def test_sums_label_sets_and_tolerates_missing_gauge(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm")
    await engine.serve_raw('# TYPE vllm:num_requests_running gauge\n'
                           'vllm:num_requests_running{model_name="a"} 2\n'
                           'vllm:num_requests_running{model_name="b"} 3\n')
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", metrics_url=f"{engine.url}/metrics", pid=engine.pid), http)
        with anyio.fail_after(10):
            assert await adapter.inflight() == 5


async def test_engine_gone(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm")
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="vllm", url=engine.url, pid_file=str(engine.pid_file)), http)
        engine.proc.kill()
        with anyio.fail_after(10):
            await engine.wait_exit(5)
            with pytest.raises(EngineError, match=f"pid file {engine.pid_file} names no running process"):
                await adapter.stop_accepting(dry_run=False)
            assert await adapter.inflight() == 0


async def test_unreachable_metrics_while_running_is_an_error(start_engine: StartEngine) -> None:
    engine = await start_engine("vllm")
    async with httpx.AsyncClient() as http:
        # The process runs, but the metrics URL points nowhere: that is not "nothing in flight".
        config = server_config(kind="vllm", metrics_url="http://127.0.0.1:9/metrics", pid=engine.pid)
        adapter = build_engine(config, http)
        with anyio.fail_after(10), pytest.raises(EngineError, match="engine request failed"):
            await adapter.inflight()
