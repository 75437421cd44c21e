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

This package needs httpx only (and anyio, which httpx itself depends on) and imports nothing else of
spotguard: it runs on any client machine. ``sse.py`` watches and joins the event streams, ``transport.py``
re-sends requests and wraps httpx's transports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from .transport import ResumePolicy, ResumingAsyncTransport, ResumingTransport

__all__ = ["ResumePolicy", "ResumingAsyncTransport", "ResumingTransport", "resumable_async_http_client",
           "resumable_http_client"]


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
