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

from spotguard.gate.targets import Target

FORWARDED_HEADER = b"spotguard-forwarded"
DROPPED_REASON_HEADER = b"spotguard-dropped-reason"
COOLDOWN = 5.0
"""Seconds a peer that failed is passed over (it is still tried when every peer is cooling down)."""
SKIP_STATUSES = frozenset({429, 503})
WITHHELD_FROM_PEERS = frozenset({b"cookie"})


class Peers:
    """The configured peers, a rotating starting point, and who failed recently."""

    def __init__(self, urls: tuple[str, ...] | list[str], *, connect_timeout: float = 2.0) -> None:
        self.peers = [Target(url, connect_timeout=connect_timeout, what="[gate] peers", withheld=WITHHELD_FROM_PEERS)
                      for url in urls]
        self._start = itertools.count()
        self._failed_at: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.peers)

    def order(self) -> Iterator[Target]:
        """Every peer once, starting one further along each call; recently failed ones last."""
        if not self.peers:
            return iter(())
        start = next(self._start) % len(self.peers)
        turn = self.peers[start:] + self.peers[:start]
        now = time.monotonic()
        fresh = [p for p in turn if now - self._failed_at.get(p.url, -COOLDOWN) >= COOLDOWN]
        return iter(fresh + [p for p in turn if p not in fresh])

    def failed(self, peer: Target) -> None:
        self._failed_at[peer.url] = time.monotonic()

    def worked(self, peer: Target) -> None:
        self._failed_at.pop(peer.url, None)

    def close(self) -> None:
        for peer in self.peers:
            peer.pool.close()
