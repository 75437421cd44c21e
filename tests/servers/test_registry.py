"""build_engine: the right adapter per kind, and configuration mistakes named by key."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from spotguard.config import load
from spotguard.errors import ConfigError
from spotguard.servers import build_engine
from spotguard.servers.triton import TritonAdapter
from tests.servers.helpers import server_config

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("keys", "name"), [
    ({"kind": "none"}, "none"),
    ({"kind": "vllm", "url": "http://127.0.0.1:8000", "pid": 1234}, "vllm"),
    ({"kind": "sglang", "metrics_url": "http://127.0.0.1:30000/metrics", "unit": "sglang.service"}, "sglang"),
    ({"kind": "tgi", "url": "http://127.0.0.1:3000", "pid_file": "/run/tgi.pid"}, "tgi"),
    ({"kind": "triton", "url": "http://127.0.0.1:8000", "triton_models": ["llm"]}, "triton"),
    ({"kind": "llamacpp", "url": "http://127.0.0.1:8080"}, "llamacpp"),
    ({"kind": "http", "stop_url": "http://127.0.0.1:1/stop"}, "http"),
    ({"kind": "command", "stop_command": ["systemctl", "stop", "engine"]}, "command"),
])
async def test_each_kind(keys: dict[str, Any], name: str) -> None:
    async with httpx.AsyncClient() as http:
        assert build_engine(server_config(**keys), http).name == name


async def test_from_environment_like_the_daemon() -> None:
    config = load(environ={"SPOTGUARD_SERVER_KIND": "triton", "SPOTGUARD_SERVER_URL": "http://10.1.2.3:8000",
                           "SPOTGUARD_SERVER_PID": "4321", "SPOTGUARD_SERVER_TIMEOUT": "1.5"},
                  path=None)
    async with httpx.AsyncClient() as http:
        adapter = build_engine(config, http)
    assert isinstance(adapter, TritonAdapter)
    assert adapter.metrics_url == "http://10.1.2.3:8002/metrics"
    assert adapter.timeout == 1.5


@pytest.mark.parametrize(("keys", "message"), [
    ({"kind": "vllm", "url": "http://x"}, r"kind = vllm is stopped with a signal: set \[server\] unit, pid_file or pid"),
    ({"kind": "tgi", "pid": 5}, r"kind = tgi reads in-flight work from its metrics: set \[server\] url or metrics_url"),
    ({"kind": "vllm", "url": "http://x", "pid": 5, "stop_signal": "SIGBOGUS"}, r"\[server\] stop_signal"),
    ({"kind": "triton", "triton_models": ["a"]}, r"\[server\] url must be set to unload"),
    ({"kind": "triton", "url": "http://x"}, r"kind = triton is stopped with a signal"),
    ({"kind": "llamacpp"}, r"\[server\] url must be set for kind = llamacpp"),
    ({"kind": "sglang", "url": "http://x", "unit": "-H"}, r"\[server\] unit: '-H' is not a systemd unit name"),
    ({"kind": "none", "timeout": 0}, r"\[server\] timeout must be > 0"),
])
async def test_config_errors(keys: dict[str, Any], message: str) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match=message):
            build_engine(server_config(**keys), http)


async def test_none_does_nothing_and_says_so() -> None:
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="none"), http)
        with anyio.fail_after(5):
            assert await adapter.stop_accepting(dry_run=False) == \
                "no engine configured ([server] kind = none): nothing stopped"
            assert await adapter.stop_accepting(dry_run=True) == \
                "no engine configured ([server] kind = none): nothing stopped"
            assert await adapter.inflight() is None
            assert await adapter.resume_accepting(dry_run=False) == \
                "no engine configured ([server] kind = none): nothing to restart"
