"""The resumable client helper against a real loopback server that cuts answers the way a gate does.

The server (plain ASGI on uvicorn) plays a scripted gate: each request it gets runs the next step of the
script, which streams chosen events and then ends cleanly, sends the resumable error event, or tears the
connection (an exception after the response started: uvicorn closes the socket mid-body). Every request
is recorded, so the tests see what the helper re-sent.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotguard import asgi
from spotguard.client import (
    ResumePolicy,
    ResumingAsyncTransport,
    ResumingTransport,
    resumable_async_http_client,
    resumable_http_client,
)
from spotguard.client.sse import SseJoin
from spotguard.client.transport import _retry_after

pytestmark = pytest.mark.anyio

WORDS = ["Once", " upon", " a", " time", ",", " a", " gate", " was", " evicted", "."]
BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "tell me a story"}]}


def chunk(n: int) -> bytes:
    delta: dict[str, Any] = {"content": WORDS[n]} if n < len(WORDS) else {}
    if n == 0:
        delta["role"] = "assistant"
    data = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if n == len(WORDS) else None}]}
    return f"id: tok.{n + 1}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


EVENTS = [chunk(n) for n in range(len(WORDS) + 1)] + [b"id: tok.done\ndata: [DONE]\n\n"]
WHOLE = b"".join(EVENTS)


def interrupted(cursor: str) -> bytes:
    error = {"error": {"message": "the replica is being evicted", "type": "interrupted_for_migration",
                       "code": 503, "resumable": True}}
    return f"id: {cursor}\ndata: {json.dumps(error)}\n\n".encode()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Step = Callable[[Seen, asgi.Send], Awaitable[None]]


@dataclass
class Script:
    steps: list[Step]
    seen: list[Seen] = field(default_factory=list)


async def _start(send: asgi.Send, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"text/event-stream") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), *(headers or [])]})


async def _body(send: asgi.Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


def stream(events: list[bytes], *, then: str = "end", resumed: bool = False, split: bool = True) -> Step:
    """Stream ``events`` (each cut in two body messages when ``split``), then end, or tear the connection."""
    async def step(_: Seen, send: asgi.Send) -> None:
        await _start(send, headers=[(b"spotguard-resumed", b"1")] if resumed else None)
        for event in events:
            if split:
                await _body(send, event[:7])
                await _body(send, event[7:])
            else:
                await _body(send, event)
        if then == "tear":
            raise RuntimeError("the VM is gone")  # uvicorn closes the socket: no last chunk
        await _body(send, b"", more=False)
    return step


def answer(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
           content_type: bytes = b"application/json") -> Step:
    async def step(_: Seen, send: asgi.Send) -> None:
        await _start(send, status, headers, content_type)
        await _body(send, body, more=False)
    return step


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[list[Step]], Awaitable[tuple[str, Script]]]]:
    async with anyio.create_task_group() as tg:
        async def start(steps: list[Step]) -> tuple[str, Script]:
            script = Script(list(steps))

            async def app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
                if scope["type"] != "http":
                    return
                seen = Seen(scope["method"], scope["path"],
                            {k.decode().lower(): v.decode() for k, v in scope["headers"]},
                            await asgi.read_body(receive))
                script.seen.append(seen)
                if not script.steps:
                    await answer(500, b'{"error":"script ran out"}')(seen, send)
                    return
                await script.steps.pop(0)(seen, send)

            bound = await tg.start(asgi.serve_tcp, app, "127.0.0.1", 0)
            return bound.url, script

        yield start
        tg.cancel_scope.cancel()


FAST = ResumePolicy(attempts=3, within=10.0, backoff=0.01)


def _sync_stream(url: str, policy: ResumePolicy = FAST) -> bytes:
    with resumable_http_client(resume=policy, timeout=10) as client, \
            client.stream("POST", f"{url}/v1/chat/completions", json=BODY,
                          headers={"Authorization": "Bearer k", "Idempotency-Key": "abc"}) as response:
        return b"".join(response.iter_bytes())


async def test_a_stream_cut_with_the_error_event_is_resumed_and_joined(serve: Any) -> None:
    url, script = await serve([stream(EVENTS[:3] + [interrupted("tok.3")]), stream(EVENTS[3:], resumed=True)])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == WHOLE  # one stream, byte for byte, no error event
    first, second = script.seen
    assert "last-event-id" not in first.headers
    assert second.headers["last-event-id"] == "tok.3"
    assert (second.method, second.path, second.body) == (first.method, first.path, first.body)
    assert second.headers["authorization"] == "Bearer k" and second.headers["idempotency-key"] == "abc"


async def test_a_torn_connection_is_resumed_from_the_last_whole_event(serve: Any) -> None:
    # The tear comes after 4 whole events and half of the fifth: the half is dropped and sent again whole.
    half = EVENTS[4][:20]

    async def torn(_: Seen, send: asgi.Send) -> None:
        await _start(send)
        await _body(send, b"".join(EVENTS[:4]) + half)
        raise RuntimeError("the VM is gone")

    url, script = await serve([torn, stream(EVENTS[4:], resumed=True)])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == WHOLE
    assert script.seen[1].headers["last-event-id"] == "tok.4"


async def test_several_cuts_in_one_answer_are_all_joined(serve: Any) -> None:
    url, script = await serve([stream(EVENTS[:2] + [interrupted("tok.2")]),
                               stream(EVENTS[2:5], then="tear", resumed=True),
                               stream(EVENTS[5:], resumed=True)])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == WHOLE
    assert [s.headers.get("last-event-id") for s in script.seen] == [None, "tok.2", "tok.5"]


async def test_retry_after_on_the_resume_request_is_honoured(serve: Any) -> None:
    busy = answer(503, b'{"error":{"message":"busy"}}', [(b"retry-after", b"0")])
    url, script = await serve([stream(EVENTS[:3] + [interrupted("tok.3")]), busy, stream(EVENTS[3:], resumed=True)])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == WHOLE
    assert len(script.seen) == 3


async def test_a_refused_resume_ends_the_stream_with_the_servers_error_event(serve: Any) -> None:
    refused = answer(410, b'{"error":{"message":"resume refused: expired"}}')
    url, _ = await serve([stream(EVENTS[:3] + [interrupted("tok.3")]), refused])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == b"".join(EVENTS[:3]) + interrupted("tok.3")  # never a silently short stream


async def test_an_answer_that_does_not_say_it_continues_is_not_joined(serve: Any) -> None:
    # A server that ignores Last-Event-ID answers afresh: joining it would repeat the first three words.
    url, script = await serve([stream(EVENTS[:3] + [interrupted("tok.3")]), stream(EVENTS)])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == b"".join(EVENTS[:3]) + interrupted("tok.3")
    assert len(script.seen) == 2


async def test_a_torn_stream_that_cannot_be_resumed_raises_the_transport_error(serve: Any) -> None:
    refused = answer(404, b'{"error":{"message":"unknown cursor"}}')
    url, _ = await serve([stream(EVENTS[:3], then="tear"), refused])
    with anyio.fail_after(20), pytest.raises(httpx.RemoteProtocolError):
        await anyio.to_thread.run_sync(_sync_stream, url)


async def test_attempts_are_bounded(serve: Any) -> None:
    busy = answer(503, b"{}", [(b"retry-after", b"0")])
    url, script = await serve([stream(EVENTS[:3] + [interrupted("tok.3")]), busy, busy, busy, busy, busy])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got.endswith(interrupted("tok.3"))
    assert len(script.seen) == 1 + FAST.attempts


async def test_a_retry_after_past_the_time_budget_is_not_waited_for(serve: Any) -> None:
    busy = answer(503, b"{}", [(b"retry-after", b"120")])
    url, script = await serve([stream(EVENTS[:3] + [interrupted("tok.3")]), busy])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url, ResumePolicy(attempts=3, within=5.0))
    assert got.endswith(interrupted("tok.3"))
    assert len(script.seen) == 2


async def test_a_torn_stream_after_done_is_a_whole_answer(serve: Any) -> None:
    url, script = await serve([stream(EVENTS, then="tear")])
    with anyio.fail_after(20):
        got = await anyio.to_thread.run_sync(_sync_stream, url)
    assert got == WHOLE and len(script.seen) == 1


async def test_non_streaming_503_with_a_cursor_is_sent_again_with_it(serve: Any) -> None:
    done = json.dumps({"id": "chatcmpl-7", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)}, "finish_reason": "stop"}]}).encode()
    cut = answer(503, b'{"error":{"type":"interrupted_for_migration"}}',
                 [(b"retry-after", b"0"), (b"spotguard-resume", b"tok.0")])
    url, script = await serve([cut, answer(200, done)])

    def call() -> httpx.Response:
        with resumable_http_client(resume=FAST, timeout=10) as client:
            return client.post(f"{url}/v1/chat/completions", json={**BODY, "stream": False})

    with anyio.fail_after(20):
        response = await anyio.to_thread.run_sync(call)
    assert response.status_code == 200 and response.content == done
    assert script.seen[1].headers["spotguard-resume"] == "tok.0"
    assert script.seen[1].body == script.seen[0].body


async def test_non_streaming_503_that_stays_refused_is_returned_as_the_server_sent_it(serve: Any) -> None:
    cut = answer(503, b'{"error":"cut"}', [(b"retry-after", b"0"), (b"spotguard-resume", b"tok.0")])
    url, script = await serve([cut, cut, cut, cut])

    def call() -> httpx.Response:
        with resumable_http_client(resume=FAST, timeout=10) as client:
            return client.post(f"{url}/v1/chat/completions", json={**BODY, "stream": False})

    with anyio.fail_after(20):
        response = await anyio.to_thread.run_sync(call)
    assert (response.status_code, response.content) == (503, b'{"error":"cut"}')
    assert response.headers["spotguard-resume"] == "tok.0"
    assert len(script.seen) == 1 + FAST.attempts


@pytest.mark.parametrize("step", [
    answer(503, b'{"error":"draining"}', [(b"retry-after", b"5")]),
    answer(404, b"nope", content_type=b"text/plain"),
    answer(200, b'{"choices":[]}'),
    answer(200, b"data: not announced as an event stream\n\n", content_type=b"text/plain"),
    stream(EVENTS[:3] + [b"data: no ids, no [DONE]\n\n"]),
])
async def test_anything_else_passes_through_untouched(serve: Any, step: Step) -> None:
    url, script = await serve([step, step])

    def call(client: httpx.Client) -> tuple[int, str, bytes]:
        with client, client.stream("POST", f"{url}/v1/chat/completions", json=BODY) as response:
            return response.status_code, response.headers["content-type"], response.read()

    with anyio.fail_after(20):
        plain = await anyio.to_thread.run_sync(call, httpx.Client(timeout=10))
        resumable = await anyio.to_thread.run_sync(call, resumable_http_client(resume=FAST, timeout=10))
    assert resumable == plain
    assert len(script.seen) == 2


async def test_the_async_client_joins_the_same_way(serve: Any) -> None:
    url, script = await serve([stream(EVENTS[:5] + [interrupted("tok.5")]), stream(EVENTS[5:6], then="tear",
                                                                                  resumed=True),
                               stream(EVENTS[6:], resumed=True)])
    with anyio.fail_after(20):
        async with resumable_async_http_client(resume=FAST, timeout=10) as client, \
                client.stream("POST", f"{url}/v1/chat/completions", json=BODY) as response:
            got = b"".join([part async for part in response.aiter_bytes()])
    assert got == WHOLE
    assert [s.headers.get("last-event-id") for s in script.seen] == [None, "tok.5", "tok.6"]


async def test_the_async_client_resends_a_non_streaming_cut_after_retry_after(serve: Any) -> None:
    cut = answer(503, b'{"error":"cut"}', [(b"retry-after-ms", b"10"), (b"spotguard-resume", b"tok.0")])
    busy = answer(503, b"{}", [(b"retry-after", b"0")])  # a draining gate without a cursor: handed back as is
    url, script = await serve([cut, cut, answer(200, b'{"ok":true}'), busy])
    with anyio.fail_after(20):
        async with resumable_async_http_client(resume=FAST, timeout=10) as client:
            response = await client.post(f"{url}/v1/chat/completions", json={**BODY, "stream": False})
            assert (response.status_code, response.content) == (200, b'{"ok":true}')
            drained = await client.post(f"{url}/v1/chat/completions", json=BODY)
    assert drained.status_code == 503 and len(script.seen) == 4
    assert [s.headers.get("spotguard-resume") for s in script.seen] == [None, "tok.0", "tok.0", None]


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "2"}, 2.0), ({"retry-after": "1.5"}, 1.5), ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0), ({"retry-after": "soon"}, None), ({}, None),
])
def test_retry_after_forms(headers: dict[str, str], seconds: float | None) -> None:
    assert _retry_after(httpx.Headers(headers)) == seconds


async def test_the_openai_sdk_streams_one_joined_answer(serve: Any) -> None:
    url, script = await serve([stream(EVENTS[:4] + [interrupted("tok.4")]), stream(EVENTS[4:], resumed=True)])

    def chat() -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0,
                               http_client=resumable_http_client(resume=FAST))
        with client:
            pieces = [part.choices[0].delta.content or "" for part in client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "tell me a story"}], stream=True)]
        return "".join(pieces)

    with anyio.fail_after(30):
        text = await anyio.to_thread.run_sync(chat)
    assert text == "".join(WORDS)
    assert script.seen[1].headers["last-event-id"] == "tok.4"
    assert script.seen[1].body == script.seen[0].body


async def test_the_openai_sdk_raises_the_servers_error_when_resuming_is_refused(serve: Any) -> None:
    url, _ = await serve([stream(EVENTS[:4] + [interrupted("tok.4")]), answer(410, b'{"error":{"message":"gone"}}')])

    def chat() -> list[str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0,
                               http_client=resumable_http_client(resume=FAST))
        got: list[str] = []
        with client:
            for part in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                       stream=True):
                got.append(part.choices[0].delta.content or "")
        return got

    with anyio.fail_after(30), pytest.raises(openai.APIError, match="evicted"):
        await anyio.to_thread.run_sync(chat)


def test_every_transport_httpx_builds_is_wrapped() -> None:
    # _wrap_all relies on httpx.Client._transport and ._mounts (not public API): pinned here.
    mounted = httpx.HTTPTransport()
    with resumable_http_client(mounts={"http://special.internal": mounted}, proxy=None) as client:
        assert isinstance(client._transport, ResumingTransport)
        wrapped = [t for t in client._mounts.values() if t is not None]
        assert wrapped and all(isinstance(t, ResumingTransport) for t in wrapped)
        assert any(t.inner is mounted for t in wrapped if isinstance(t, ResumingTransport))
    async_client = resumable_async_http_client()
    assert isinstance(async_client._transport, ResumingAsyncTransport)


def test_the_helper_needs_only_httpx() -> None:
    """It must import on a client machine with nothing but httpx (and httpx's own dependencies)."""
    imported: set[str] = set()
    for source in (Path(__file__).parents[1] / "spotguard" / "client").glob("*.py"):
        tree = ast.parse(source.read_text())
        imported |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    outside = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    assert outside <= {"httpx", "anyio"}  # anyio is a dependency of httpx itself; the rest is relative
    # And it really imports with every other third-party package blocked.
    code = (
        "import sys, importlib.abc\n"
        "allowed = {'httpx', 'httpcore', 'anyio', 'sniffio', 'idna', 'certifi', 'h11', 'spotguard'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top in sys.stdlib_module_names or top in allowed: return None\n"
        "        raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import spotguard.client\n"
        "ours = sorted(m for m in sys.modules if m.startswith('spotguard'))\n"
        "assert ours == ['spotguard', 'spotguard.client', 'spotguard.client.sse', 'spotguard.client.transport'], ours\n"
        "spotguard.client.resumable_http_client().close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(WHOLE)), max_size=30), crlf=st.booleans())
def test_how_the_bytes_are_cut_into_chunks_never_changes_what_passes(cuts: list[int], crlf: bool) -> None:
    stream_bytes = b"".join(EVENTS[:4]) + interrupted("tok.4")
    if crlf:
        stream_bytes = stream_bytes.replace(b"\n", b"\r\n")
    bounds = sorted({min(c, len(stream_bytes)) for c in cuts} | {0, len(stream_bytes)})
    join = SseJoin()
    passed = b"".join(join.feed(stream_bytes[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    expected = b"".join(EVENTS[:4])
    assert passed == (expected.replace(b"\n", b"\r\n") if crlf else expected)
    assert join.last_id == "tok.4" and join.interrupted is not None and join.verdict(None) == "resume"


def test_text_that_mentions_the_error_type_is_not_taken_for_the_error_event() -> None:
    join = SseJoin()
    event = b'id: tok.1\ndata: {"choices":[{"delta":{"content":"interrupted_for_migration"}}]}\n\n'
    assert join.feed(event) == event and join.interrupted is None
    fake = b'id: tok.2\ndata: {"error":{"type":"interrupted_for_migration","resumable":false}}\n\n'
    assert join.feed(fake) == fake and join.interrupted is None  # not resumable: the application sees it
