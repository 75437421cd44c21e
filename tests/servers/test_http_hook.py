"""kind = http against a loopback ASGI server that records what it was sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from spotguard.asgi import Receive, Scope, Send, read_body, respond, serve_tcp
from spotguard.errors import ConfigError, EngineError, ManualActionRequired
from spotguard.servers import build_engine
from tests.servers.helpers import server_config

pytestmark = pytest.mark.anyio


@dataclass
class Hook:
    url: str = ""
    seen: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    status: int = 200
    inflight_body: str = '{"data": {"queues": [{"n": 1}, {"n": 4}]}}'


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    state = Hook()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        content_type = next((v.decode() for k, v in scope["headers"] if k == b"content-type"), "")
        state.seen.append((scope["method"], scope["path"], content_type, body))
        if scope["path"] == "/inflight":
            await respond(send, 200, state.inflight_body, content_type="application/json")
        else:
            await respond(send, state.status, "refused: maintenance" if state.status >= 300 else "ok")

    async with anyio.create_task_group() as tg:
        bound = await tg.start(serve_tcp, app, "127.0.0.1", 0)
        state.url = bound.url
        yield state
        tg.cancel_scope.cancel()


async def test_stop_request_method_path_body(hook: Hook) -> None:
    async with httpx.AsyncClient() as http:
        config = server_config(kind="http", stop_url=f"{hook.url}/admin/drain?force=1", stop_method="put",
                               stop_body='{"mode": "drain", "grace": 30}')
        adapter = build_engine(config, http)
        with anyio.fail_after(10):
            assert adapter.name == "http"
            assert await adapter.stop_accepting(dry_run=True) == (
                f"would send PUT {hook.url}/admin/drain?force=1 with a 30-byte JSON body")
            assert hook.seen == []
            assert await adapter.stop_accepting(dry_run=False) == f"PUT {hook.url}/admin/drain?force=1: HTTP 200"
        assert hook.seen == [("PUT", "/admin/drain", "application/json", b'{"mode": "drain", "grace": 30}')]
        assert await adapter.inflight() is None  # no inflight_url


async def test_stop_refused(hook: Hook) -> None:
    hook.status = 409
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="http", stop_url=f"{hook.url}/stop"), http)
        with anyio.fail_after(10), pytest.raises(EngineError, match="POST .*/stop: HTTP 409: refused: maintenance"):
            await adapter.stop_accepting(dry_run=False)
        assert hook.seen == [("POST", "/stop", "", b"")]


@pytest.mark.parametrize(("body", "path", "expected"), [
    ('{"data": {"queues": [{"n": 1}, {"n": 4}]}}', "data.queues.1.n", 4),
    ('{"data": {"queues": [{"n": 1}, {"n": 4}]}}', "data.queues.-1.n", 4),
    ("7", "", 7),
    ('{"running": 3.0}', "running", 3),
    ('{"running": "12"}', "running", 12),
])
async def test_inflight_json_path(hook: Hook, body: str, path: str, expected: int) -> None:
    hook.inflight_body = body
    async with httpx.AsyncClient() as http:
        config = server_config(kind="http", stop_url=f"{hook.url}/stop", inflight_url=f"{hook.url}/inflight",
                               inflight_json_path=path)
        with anyio.fail_after(10):
            assert await build_engine(config, http).inflight() == expected
        assert hook.seen[-1][:2] == ("GET", "/inflight")


@pytest.mark.parametrize(("body", "path", "message"), [
    ('{"data": {}}', "data.queues.0", "no 'queues' on the path"),
    ('{"a": [1]}', "a.5", "no '5' on the path"),
    ('{"running": -1}', "running", "-1 is not an in-flight count"),
    ('{"running": 2.5}', "running", "2.5 is not an in-flight count"),
    ('{"running": true}', "running", "true is not an in-flight count"),
    ('{"running": null}', "running", "null is not an in-flight count"),
    ("<html>", "", "not JSON"),
])
async def test_inflight_bad_answers(hook: Hook, body: str, path: str, message: str) -> None:
    hook.inflight_body = body
    async with httpx.AsyncClient() as http:
        config = server_config(kind="http", stop_url=f"{hook.url}/stop", inflight_url=f"{hook.url}/inflight",
                               inflight_json_path=path)
        with anyio.fail_after(10), pytest.raises(EngineError, match=message):
            await build_engine(config, http).inflight()


async def test_unreachable_hook() -> None:
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="http", stop_url="http://127.0.0.1:9/stop", timeout=1), http)
        with anyio.fail_after(5), pytest.raises(EngineError, match="engine request failed"):
            await adapter.stop_accepting(dry_run=False)


@pytest.mark.parametrize(("keys", "message"), [
    ({}, r"\[server\] stop_url must be set"),
    ({"stop_url": "http://x/stop", "stop_method": "TRACE"}, r"\[server\] stop_method: 'TRACE'"),
    ({"stop_url": "http://x/stop", "stop_body": "{mode: drain}"}, r"\[server\] stop_body is not JSON"),
])
async def test_config_errors(keys: dict[str, str], message: str) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match=message):
            build_engine(server_config(kind="http", **keys), http)



async def test_resume_needs_a_person_and_calls_nothing(hook: Hook) -> None:
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="http", stop_url=f"{hook.url}/admin/drain"), http)
        with anyio.fail_after(5), pytest.raises(ManualActionRequired, match="restart the engine .or re-enable it. by hand"):
            await adapter.resume_accepting(dry_run=False)
    assert hook.seen == []
