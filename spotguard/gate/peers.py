"""Where a draining gate sends work: ``[gate] peers``, tried in turn from a rotating start.

A peer is any OpenAI-compatible base URL: another node's gate, its engine, or the internal load balancer
in front of the fleet (which may route back here; the loop guard below makes that harmless). A peer that
refused a connection, timed out connecting, or answered 503/429 is skipped for ``COOLDOWN`` seconds.

Loop guard: a forwarded request carries ``Spotguard-Forwarded: <instance id>``. A gate never forwards a
request that carries it, and a draining gate answers one with 503 at once (``Spotguard-Dropped-Reason:
draining``), so the forwarder moves on to the next peer.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from spotguard.errors import ConfigError

FORWARDED_HEADER = b"spotguard-forwarded"
DROPPED_REASON_HEADER = b"spotguard-dropped-reason"
COOLDOWN = 5.0
"""Seconds a peer that failed is passed over (it is still tried when every peer is cooling down)."""
SKIP_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Peer:
    url: str
    scheme: str
    host: str
    port: int
    prefix: bytes
    """The base URL's path (no trailing slash), put in front of the request's path."""

    @classmethod
    def parse(cls, url: str) -> Peer:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"[gate] peers: expected base URLs like http://10.0.0.7:8080, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url=url.rstrip("/"), scheme=parts.scheme, host=parts.hostname, port=port,
                   prefix=parts.path.rstrip("/").encode())


class Peers:
    """The configured peers, a rotating starting point, and who failed recently."""

    def __init__(self, urls: tuple[str, ...] | list[str]) -> None:
        self.peers = [Peer.parse(url) for url in urls]
        self._start = itertools.count()
        self._failed_at: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.peers)

    def order(self) -> Iterator[Peer]:
        """Every peer once, starting one further along each call; recently failed ones last."""
        if not self.peers:
            return iter(())
        start = next(self._start) % len(self.peers)
        turn = self.peers[start:] + self.peers[:start]
        now = time.monotonic()
        fresh = [p for p in turn if now - self._failed_at.get(p.url, -COOLDOWN) >= COOLDOWN]
        return iter(fresh + [p for p in turn if p not in fresh])

    def failed(self, peer: Peer) -> None:
        self._failed_at[peer.url] = time.monotonic()

    def worked(self, peer: Peer) -> None:
        self._failed_at.pop(peer.url, None)
