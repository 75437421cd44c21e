"""The transports: re-send a cut request with its cursor, and join the answers (see the package docstring)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass

import anyio
import httpx

from .sse import SseJoin

RESUME_HEADER = "Spotguard-Resume"
RESUMED_HEADER = "Spotguard-Resumed"
"""Set by a gate on an answer that continues the one a ``Last-Event-ID`` or ``Spotguard-Resume`` names."""
LAST_EVENT_ID = "Last-Event-ID"
_RETRY = (429, 502, 503, 504)


@dataclass(frozen=True, kw_only=True)
class ResumePolicy:
    """How hard to try: per interruption, ``attempts`` requests within ``within`` seconds (waits included;
    each after the server's ``Retry-After``, else the first at once and the next after a doubling backoff
    from ``backoff``); at most ``max_resumes`` interruptions joined into one answer."""

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


@dataclass(frozen=True)
class _Send:
    request: httpx.Request


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Drain:
    """Read the response whole (``read``) or just close it: a stream that is not joined may be long."""

    response: httpx.Response
    read: bool


_Effect = _Send | _Sleep | _Drain
_Plan = Generator[_Effect, "httpx.Response | httpx.TransportError | bytes | None", "httpx.Response | None"]


def _again_plan(policy: ResumePolicy, request: httpx.Request, body: bytes, header: str, cursor: str,
                response: httpx.Response | None) -> _Plan:
    """Send the request again with ``header: cursor`` until an answer can be kept; written once, without I/O,
    for both transports. It yields what to do (send, sleep, read a response whole) and gets the outcome:
    a response or a transport error for a send, the raw bytes for a drain.

    Non-streaming (``Spotguard-Resume``, starting from the 503 that carried the cursor): any answer but
    another such 503 is kept; when attempts run out, the last 503 is returned as the server sent it.
    Streaming (``Last-Event-ID``, no response yet): only an event stream that says it continues the
    answer (``Spotguard-Resumed``) is kept; 429/502/503/504 are tried again; anything else, or attempts
    running out, is None. A 503 carrying a newer cursor (the resuming gate cut too) moves the cursor on.
    """
    streaming = header == LAST_EVENT_ID
    attempts = _Attempts(policy)
    fallback: httpx.Response | None = None
    headers: httpx.Headers | None = None
    while True:
        if response is not None:
            cursor = _resume_cursor(response) or cursor
            if streaming and _is_event_stream(response) and RESUMED_HEADER.lower() in response.headers:
                return response
            if not streaming and _resume_cursor(response) is None:
                return response
            headers = response.headers
            retry = not streaming or response.status_code in _RETRY
            raw = yield _Drain(response, read=not streaming)  # a refused resume's body is not used: closed unread
            if not streaming:
                fallback = _kept(response, raw if isinstance(raw, bytes) else b"")
            elif not retry:
                return None
        delay = attempts.delay(headers)
        if delay is None:
            return fallback
        yield _Sleep(delay)
        outcome = yield _Send(_again(request, body, header, cursor))
        response = outcome if isinstance(outcome, httpx.Response) else None
        headers = None


def _kept(response: httpx.Response, raw: bytes) -> httpx.Response:
    """A response already read, to hand back as it came (raw bytes: content-encoding still applies)."""
    return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(raw),
                          extensions={k: v for k, v in response.extensions.items() if k != "network_stream"})


def _wrapped(response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    return httpx.Response(response.status_code, headers=response.headers, stream=stream,
                          extensions=response.extensions)


class ResumingTransport(httpx.BaseTransport):
    """Wraps a transport so cut answers are resumed and joined (see the package's docstring)."""

    def __init__(self, inner: httpx.BaseTransport, policy: ResumePolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or ResumePolicy()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = _known_body(request)
        if body is None:
            return response
        cursor = _resume_cursor(response)
        if cursor is not None:
            kept = self._run(_again_plan(self.policy, request, body, RESUME_HEADER, cursor, response))
            assert kept is not None  # the non-streaming plan always ends with an answer
            response = kept
        if not _is_event_stream(response):
            return response
        return _wrapped(response, _JoinedStream(self, request, body, response))

    def resume_stream(self, request: httpx.Request, body: bytes, last_id: str) -> httpx.Response | None:
        """The continuation of a stream after ``last_id``; None when refused or out of attempts."""
        return self._run(_again_plan(self.policy, request, body, LAST_EVENT_ID, last_id, None))

    def _run(self, plan: _Plan) -> httpx.Response | None:
        outcome: httpx.Response | httpx.TransportError | bytes | None = None
        while True:
            try:
                effect = plan.send(outcome)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            outcome = None
            if isinstance(effect, _Sleep):
                time.sleep(effect.seconds)
            elif isinstance(effect, _Send):
                try:
                    outcome = self.inner.handle_request(effect.request)
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                try:
                    outcome = b"".join(effect.response.iter_raw()) if effect.read else b""
                except httpx.TransportError:
                    outcome = b""
                finally:
                    effect.response.close()

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
        join = SseJoin()
        resumes = 0
        while True:
            error: httpx.TransportError | None = None
            try:
                for chunk in self._response.iter_raw():
                    if passed := join.feed(chunk):
                        yield passed
                    if join.interrupted is not None:
                        break
            except httpx.TransportError as exc:
                error = exc
            finally:
                self._response.close()
            verdict = join.verdict(error)
            if verdict == "resume" and join.last_id and resumes < self._transport.policy.max_resumes:
                resumes += 1
                following = self._transport.resume_stream(self._request, self._body, join.last_id)
                if following is not None:
                    self._response = following
                    join.restart()
                    continue
            if last := join.ending(error, verdict):
                yield last
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
        cursor = _resume_cursor(response)
        if cursor is not None:
            kept = await self._run(_again_plan(self.policy, request, body, RESUME_HEADER, cursor, response))
            assert kept is not None  # the non-streaming plan always ends with an answer
            response = kept
        if not _is_event_stream(response):
            return response
        return _wrapped(response, _AsyncJoinedStream(self, request, body, response))

    async def resume_stream(self, request: httpx.Request, body: bytes, last_id: str) -> httpx.Response | None:
        return await self._run(_again_plan(self.policy, request, body, LAST_EVENT_ID, last_id, None))

    async def _run(self, plan: _Plan) -> httpx.Response | None:
        outcome: httpx.Response | httpx.TransportError | bytes | None = None
        while True:
            try:
                effect = plan.send(outcome)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            outcome = None
            if isinstance(effect, _Sleep):
                await anyio.sleep(effect.seconds)
            elif isinstance(effect, _Send):
                try:
                    outcome = await self.inner.handle_async_request(effect.request)
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                try:
                    outcome = b"".join([part async for part in effect.response.aiter_raw()]) if effect.read else b""
                except httpx.TransportError:
                    outcome = b""
                finally:
                    await effect.response.aclose()

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
        join = SseJoin()
        resumes = 0
        while True:
            error: httpx.TransportError | None = None
            try:
                async for chunk in self._response.aiter_raw():
                    if passed := join.feed(chunk):
                        yield passed
                    if join.interrupted is not None:
                        break
            except httpx.TransportError as exc:
                error = exc
            finally:
                await self._response.aclose()
            verdict = join.verdict(error)
            if verdict == "resume" and join.last_id and resumes < self._transport.policy.max_resumes:
                resumes += 1
                following = await self._transport.resume_stream(self._request, self._body, join.last_id)
                if following is not None:
                    self._response = following
                    join.restart()
                    continue
            if last := join.ending(error, verdict):
                yield last
            return

    async def aclose(self) -> None:
        await self._response.aclose()


