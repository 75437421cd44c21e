"""HTTP clients that finish answers a spotguard gate had to cut, for any OpenAI SDK or plain httpx.

    from openai import OpenAI
    from spotguard.client import resumable_http_client

    client = OpenAI(base_url="http://gate.internal:8001/v1", http_client=resumable_http_client())

When a node is evicted, its gate ends each answer it cannot finish in a way a client can pick up:

- a stream ends with one last SSE event, ``{"error": {"type": "interrupted_for_migration", "resumable": true,
  ...}}``, whose ``id:`` is the cursor of the last event the client got;
- a non-streaming request gets 503 with ``Retry-After`` and ``Spotguard-Resume: <cursor>``.

The transport these clients use sends the same request again (method, URL, headers, body) with
``Last-Event-ID: <last id seen>`` (streams) or ``Spotguard-Resume: <cursor>`` (non-streaming), to whichever
gate the load balancer picks, and joins the answers: the application sees one uninterrupted stream. The
error event is dropped; every byte before it passes through unchanged (whole events: a stream is passed
on an event at a time). A stream whose connection breaks without ``[DONE]`` is resumed the same way from
the last ``id:`` seen. A resumed stream is joined only when the answer says it continues the answer
(``Spotguard-Resumed`` header): a server that ignores ``Last-Event-ID`` and answers afresh would repeat text.

Each interruption gets a few attempts (``ResumePolicy``), honouring ``Retry-After`` within a bounded total
time. When resuming is refused or impossible the application gets what the server sent: the stream ends
with the server's own error event (the OpenAI SDKs raise it as an ``APIError``), the non-streaming request
returns the server's 503, a broken connection raises its transport error. Never a silently short stream.
Anything else (other statuses, other content types, requests whose body is a stream) passes through
untouched.

This module needs httpx only (and anyio, which httpx itself depends on): it runs on any client machine.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

__all__ = ["ResumePolicy", "ResumingAsyncTransport", "ResumingTransport", "resumable_async_http_client",
           "resumable_http_client"]

RESUMABLE_ERROR = "interrupted_for_migration"
RESUME_HEADER = "Spotguard-Resume"
RESUMED_HEADER = "Spotguard-Resumed"
"""Set by a gate on an answer that continues the one a ``Last-Event-ID`` or ``Spotguard-Resume`` names."""
LAST_EVENT_ID = "Last-Event-ID"
MAX_EVENT = 8 << 20
"""Bytes of one SSE event held while it arrives; a longer one turns the stream into a plain pass-through."""
_RETRY = (429, 502, 503, 504)


@dataclass(frozen=True, kw_only=True)
class ResumePolicy:
    """How hard to try: per interruption, ``attempts`` requests within ``within`` seconds (waits included;
    each after the server's ``Retry-After``, else the first at once and the next after a doubling backoff
    from ``backoff``); at most
    ``max_resumes`` interruptions joined into one answer."""

    attempts: int = 4
    within: float = 30.0
    backoff: float = 0.25
    max_resumes: int = 8


class _Attempts:
    """One interruption's budget: how long to wait before the next try, or None when it is spent."""

    def __init__(self, policy: ResumePolicy) -> None:
        self._policy = policy
        self._tries = 0
        self._until = time.monotonic() + policy.within

    def delay(self, headers: httpx.Headers | None) -> float | None:
        policy = self._policy
        if self._tries >= policy.attempts:
            return None
        wait = _retry_after(headers)
        if wait is None:
            wait = 0.0 if self._tries == 0 else policy.backoff * 2 ** (self._tries - 1)
        self._tries += 1
        return wait if time.monotonic() + wait < self._until else None


def _retry_after(headers: httpx.Headers | None) -> float | None:
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    try:
        if millis is not None:
            return max(0.0, float(millis) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


class _SseJoin:
    """Passes an SSE stream on whole events at a time and watches it: the last ``id:``, ``[DONE]``, and the
    resumable error event, which it holds back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self.last_id: str | None = None
        self.done = False
        self.interrupted: bytes | None = None
        """The resumable error event, held back from the application."""
        self.plain = False
        """An event too large to hold: from then on bytes pass straight through and nothing is resumed."""

    def feed(self, chunk: bytes) -> bytes:
        if self.plain:
            return chunk
        buffer = self._buffer
        buffer += chunk
        passed: list[bytes] = []
        start = 0
        while True:
            end = _blank_line(buffer, max(start, self._scanned))
            if end < 0:
                break
            event = bytes(buffer[start:end])
            start = end
            if self._watch(event):
                passed.append(event)
        del buffer[:start]
        self._scanned = max(0, len(buffer) - 2)
        if len(buffer) > MAX_EVENT:
            self.plain = True
            passed.append(bytes(buffer))
            buffer.clear()
        return b"".join(passed)

    def tail(self) -> bytes:
        """What is left at a clean end (an event without its blank line): passed on as it is."""
        rest = bytes(self._buffer)
        self.restart()
        return rest

    def restart(self) -> None:
        """A new answer joins: a torn event's start is dropped (the holder sends it again, whole)."""
        self._buffer.clear()
        self._scanned = 0
        self.interrupted = None

    def _watch(self, event: bytes) -> bool:
        data: list[bytes] = []
        event_id: bytes | None = None
        for line in event.split(b"\n"):
            line = line.removesuffix(b"\r")
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line.startswith(b"id:"):
                event_id = line[4:] if line.startswith(b"id: ") else line[3:]
        if event_id is not None and b"\x00" not in event_id:  # the WHATWG rule: an id with NUL is ignored
            self.last_id = event_id.decode("utf-8", "replace")
        text = b"\n".join(data)
        if text == b"[DONE]":
            self.done = True
        elif RESUMABLE_ERROR.encode() in text and _is_resumable_error(text):
            self.interrupted = event
            return False
        return True

    def verdict(self, error: Exception | None) -> str:
        """After an answer's body ended: ``done``, ``resume`` or ``fail``."""
        if self.plain:
            return "fail" if error is not None else "done"
        if self.interrupted is not None:
            return "resume" if self.last_id else "fail"
        if error is None or self.done:  # a break after [DONE] loses nothing
            return "done"
        return "resume" if self.last_id else "fail"


def _blank_line(buffer: bytearray, start: int) -> int:
    """The end (exclusive) of the first event in ``buffer`` ending at or after ``start``, or -1."""
    ends = [i for i in (buffer.find(b"\n\n", start), buffer.find(b"\n\r\n", start)) if i >= 0]
    if not ends:
        return -1
    first = min(ends)
    return first + (2 if buffer.startswith(b"\n\n", first) else 3)


def _is_resumable_error(text: bytes) -> bool:
    try:
        data = json.loads(text)
    except ValueError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("type") == RESUMABLE_ERROR and error.get("resumable") is True


def _known_body(request: httpx.Request) -> bytes | None:
    """The request's body when it can be sent again (bytes, not a stream)."""
    try:
        return request.content
    except httpx.RequestNotRead:
        return None


def _again(request: httpx.Request, body: bytes, header: str, value: str) -> httpx.Request:
    headers = request.headers.copy()
    for name in (LAST_EVENT_ID, RESUME_HEADER):
        headers.pop(name, None)
    headers[header] = value
    return httpx.Request(request.method, request.url, headers=headers, content=body, extensions=request.extensions)


def _is_event_stream(response: httpx.Response) -> bool:
    return (response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream")
            and response.headers.get("content-encoding", "identity") == "identity")


def _resume_cursor(response: httpx.Response) -> str | None:
    return response.headers.get(RESUME_HEADER) if response.status_code == 503 else None


def _verdict(response: httpx.Response) -> str:
    """Of an answer to a resume request: ``ok`` (join it), ``retry`` or ``refused``."""
    if _is_event_stream(response) and RESUMED_HEADER.lower() in response.headers:
        return "ok"
    return "retry" if response.status_code in _RETRY else "refused"


def _kept(response: httpx.Response, raw: bytes) -> httpx.Response:
    """A response already read, to hand back as it came (raw bytes: content-encoding still applies)."""
    return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(raw),
                          extensions={k: v for k, v in response.extensions.items() if k != "network_stream"})


def _wrapped(response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    return httpx.Response(response.status_code, headers=response.headers, stream=stream,
                          extensions=response.extensions)


class ResumingTransport(httpx.BaseTransport):
    """Wraps a transport so cut answers are resumed and joined (see the module's docstring)."""

    def __init__(self, inner: httpx.BaseTransport, policy: ResumePolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or ResumePolicy()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = _known_body(request)
        if body is None:
            return response
        response = self._follow_cursor(request, body, response)
        if not _is_event_stream(response):
            return response
        return _wrapped(response, _JoinedStream(self, request, body, response))

    def _follow_cursor(self, request: httpx.Request, body: bytes, response: httpx.Response) -> httpx.Response:
        attempts = _Attempts(self.policy)
        while (cursor := _resume_cursor(response)) is not None:
            kept = _kept(response, b"".join(response.iter_raw()))
            response.close()
            while True:
                delay = attempts.delay(kept.headers)
                if delay is None:
                    return kept
                time.sleep(delay)
                try:
                    response = self.inner.handle_request(_again(request, body, RESUME_HEADER, cursor))
                    break
                except httpx.TransportError:
                    continue
        return response

    def resume_stream(self, request: httpx.Request, body: bytes, last_id: str) -> httpx.Response | None:
        """The continuation of a stream after ``last_id``; None when refused or out of attempts."""
        attempts = _Attempts(self.policy)
        headers: httpx.Headers | None = None
        while (delay := attempts.delay(headers)) is not None:
            time.sleep(delay)
            try:
                response = self.inner.handle_request(_again(request, body, LAST_EVENT_ID, last_id))
            except httpx.TransportError:
                headers = None
                continue
            verdict = _verdict(response)
            if verdict == "ok":
                return response
            headers = response.headers
            last_id = _resume_cursor(response) or last_id  # a resuming gate cut before its first byte
            response.read()
            response.close()
            if verdict == "refused":
                return None
        return None

    def close(self) -> None:
        self.inner.close()


class _JoinedStream(httpx.SyncByteStream):
    def __init__(self, transport: ResumingTransport, request: httpx.Request, body: bytes,
                 response: httpx.Response) -> None:
        self._transport = transport
        self._request = request
        self._body = body
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        join = _SseJoin()
        resumes = 0
        while True:
            error: httpx.TransportError | None = None
            try:
                for chunk in self._response.iter_raw():
                    passed = join.feed(chunk)
                    if passed:
                        yield passed
                    if join.interrupted is not None:
                        break
            except httpx.TransportError as exc:
                error = exc
            finally:
                self._response.close()
            verdict = join.verdict(error)
            if verdict == "done":
                if tail := join.tail():
                    yield tail
                return
            if verdict == "resume" and join.last_id and resumes < self._transport.policy.max_resumes:
                resumes += 1
                following = self._transport.resume_stream(self._request, self._body, join.last_id)
                if following is not None:
                    self._response = following
                    join.restart()
                    continue
            if join.interrupted is not None:
                yield join.interrupted
                return
            if error is not None:
                raise error
            return

    def close(self) -> None:
        self._response.close()


class ResumingAsyncTransport(httpx.AsyncBaseTransport):
    """The asyncio/trio twin of ``ResumingTransport``."""

    def __init__(self, inner: httpx.AsyncBaseTransport, policy: ResumePolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or ResumePolicy()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = _known_body(request)
        if body is None:
            return response
        response = await self._follow_cursor(request, body, response)
        if not _is_event_stream(response):
            return response
        return _wrapped(response, _AsyncJoinedStream(self, request, body, response))

    async def _follow_cursor(self, request: httpx.Request, body: bytes, response: httpx.Response) -> httpx.Response:
        attempts = _Attempts(self.policy)
        while (cursor := _resume_cursor(response)) is not None:
            kept = _kept(response, b"".join([chunk async for chunk in response.aiter_raw()]))
            await response.aclose()
            while True:
                delay = attempts.delay(kept.headers)
                if delay is None:
                    return kept
                await anyio.sleep(delay)
                try:
                    response = await self.inner.handle_async_request(_again(request, body, RESUME_HEADER, cursor))
                    break
                except httpx.TransportError:
                    continue
        return response

    async def resume_stream(self, request: httpx.Request, body: bytes, last_id: str) -> httpx.Response | None:
        attempts = _Attempts(self.policy)
        headers: httpx.Headers | None = None
        while (delay := attempts.delay(headers)) is not None:
            await anyio.sleep(delay)
            try:
                response = await self.inner.handle_async_request(_again(request, body, LAST_EVENT_ID, last_id))
            except httpx.TransportError:
                headers = None
                continue
            verdict = _verdict(response)
            if verdict == "ok":
                return response
            headers = response.headers
            last_id = _resume_cursor(response) or last_id
            await response.aread()
            await response.aclose()
            if verdict == "refused":
                return None
        return None

    async def aclose(self) -> None:
        await self.inner.aclose()


class _AsyncJoinedStream(httpx.AsyncByteStream):
    def __init__(self, transport: ResumingAsyncTransport, request: httpx.Request, body: bytes,
                 response: httpx.Response) -> None:
        self._transport = transport
        self._request = request
        self._body = body
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        join = _SseJoin()
        resumes = 0
        while True:
            error: httpx.TransportError | None = None
            try:
                async for chunk in self._response.aiter_raw():
                    passed = join.feed(chunk)
                    if passed:
                        yield passed
                    if join.interrupted is not None:
                        break
            except httpx.TransportError as exc:
                error = exc
            finally:
                await self._response.aclose()
            verdict = join.verdict(error)
            if verdict == "done":
                if tail := join.tail():
                    yield tail
                return
            if verdict == "resume" and join.last_id and resumes < self._transport.policy.max_resumes:
                resumes += 1
                following = await self._transport.resume_stream(self._request, self._body, join.last_id)
                if following is not None:
                    self._response = following
                    join.restart()
                    continue
            if join.interrupted is not None:
                yield join.interrupted
                return
            if error is not None:
                raise error
            return

    async def aclose(self) -> None:
        await self._response.aclose()


def _wrap_all(client: httpx.Client | httpx.AsyncClient, wrap: Callable[[Any], Any]) -> None:
    # httpx builds its default transport and the environment's proxy transports (HTTPS_PROXY, NO_PROXY...)
    # from the client's own arguments; wrapping what it built keeps all of that exactly as httpx does it.
    # The attributes are not public API: tests/test_client.py pins them.
    client._transport = wrap(client._transport)  # noqa: SLF001
    client._mounts = {pattern: None if transport is None else wrap(transport)  # noqa: SLF001
                      for pattern, transport in client._mounts.items()}  # noqa: SLF001


def resumable_http_client(*, resume: ResumePolicy | None = None, **httpx_kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` (any httpx keyword argument) whose requests resume answers a gate cut; pass it as
    ``http_client=`` to an OpenAI SDK client."""
    client = httpx.Client(**httpx_kwargs)
    _wrap_all(client, lambda transport: ResumingTransport(transport, resume))
    return client


def resumable_async_http_client(*, resume: ResumePolicy | None = None, **httpx_kwargs: Any) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` twin of ``resumable_http_client`` (for ``AsyncOpenAI(http_client=...)``)."""
    client = httpx.AsyncClient(**httpx_kwargs)
    _wrap_all(client, lambda transport: ResumingAsyncTransport(transport, resume))
    return client
