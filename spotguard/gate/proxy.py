"""The gate: a reverse proxy in front of the engine that journals chat/completions requests.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are journaled (see ``registry.py`` for the
life of a journaled request); every other request the path policy allows (``routes.py``: the inference API,
health and ``[gate] allow_paths``; anything else is 403) is passed through untouched: method, path,
query, headers (hop-by-hop ones aside), body and status, streamed both ways. Authorization headers
are forwarded and never stored or logged; bodies and outputs are user data and never logged.

The daemon declares the state it wants (``apply``: ``protocol.DesiredState``). Once draining, every NEW
request goes to a peer (``relay.py``) or gets 503 with ``Retry-After`` and a JSON error, while requests
already in flight carry on. An interrupted request (``interrupt_all``) has its upstream connection
closed, so the engine frees the slot, and is continued on a peer or, without peers, its client gets a
clean end: a final SSE ``data: {"error": ...}`` event saying it was interrupted for migration, or a 503
when no answer had started yet. Answers still relayed from peers end the same way just before the VM's
deadline.

Speed matters (the gate sits on every token). The data path is plain asyncio protocols over httptools
(``http1.py``), run on uvloop by ``spotguard gate``: no task and no ASGI message per request or chunk,
only callbacks. Per chunk the gate frames and writes the bytes it got; a journaled stream also hands
them to the SSE parser (``output.py``), which parses in batches and whenever the journal is read. Every request
enters through one method, ``Gate.handle``, where a check (routes, peers) can hook in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog
from prometheus_client import Counter

from spotguard.config import GateConfig
from spotguard.errors import ConfigError
from spotguard.gate.answer import error_body, json_error
from spotguard.gate.context import Tracked
from spotguard.gate.estimate import finishes_within, pace
from spotguard.gate.exchange import LocalExchange
from spotguard.gate.held import Origin
from spotguard.gate.holding import Holding, retry_signal
from spotguard.gate.http1 import ClientConnection
from spotguard.gate.journal import LocalJournal
from spotguard.gate.leg import drop
from spotguard.gate.limits import ClientConnections, ClientLimits, fd_limit
from spotguard.gate.peers import FORWARDED_HEADER, Peers
from spotguard.gate.protocol import DesiredState, HeldState, JournalEntry
from spotguard.gate.registry import Registry
from spotguard.gate.relay import PeerRelay
from spotguard.gate.request import Request, status_line
from spotguard.gate.resume import Resumption
from spotguard.gate.routes import Routes
from spotguard.gate.stitch import AnswerIdentity
from spotguard.gate.targets import Target
from spotguard.metrics import Metrics

JOURNALED = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""Paths whose POSTs are journaled, and their label in metrics."""

PEER_CONNECT_TIMEOUT = 2.0
"""Seconds to connect to a peer before trying the next: a dead peer must not eat the window."""
RELAY_END_MARGIN = 1.0
"""Seconds before the VM's deadline at which answers still relayed from peers are ended cleanly."""
STATS_GAPS = 100
"""Recent seam gaps sent with each stats answer (the daemon polls every second)."""
HANDOVER_CHECK = 0.5
"""Seconds between checks, while draining, of which answers will not finish here before the drain deadline."""
INDEX_WRITE_TIMEOUT = 5.0
"""Most seconds an index entry may take to be written (less when the VM goes sooner)."""
TIMEOUT_SWEEP = 1.0
"""Seconds between checks for engine answers that stopped arriving (read timeout)."""


class Gate:
    """The data plane: serve it with ``run_gate``; ``aclose()`` it when done."""

    def __init__(self, *, upstream: str, metrics: Metrics, retry_after: int = 5, read_timeout: float = 600.0,
                 connect_timeout: float = 5.0, limits: ClientLimits | None = None,
                 log: structlog.stdlib.BoundLogger | None = None, allow_paths: tuple[str, ...] = (),
                 peers: tuple[str, ...] = (), instance_id: str = "", engine_kind: str = "openai",
                 holding: Holding | None = None) -> None:
        self._routes = Routes(allow_paths)
        self.holding = holding
        """Resume (``[resume]``): None when it is off."""
        self.engine = Target(upstream, connect_timeout=connect_timeout)
        self._connect_timeout = connect_timeout
        self.peers = self._peers(peers)
        self.forwarded_header = (FORWARDED_HEADER, (instance_id or socket.gethostname()).encode("latin-1", "replace"))
        self.engine_kind = engine_kind
        self.registry = Registry()
        """The journaled requests: the gate owns them; the daemon reads copies (``journal_entries``)."""
        self.journal = LocalJournal(self)
        """``JournalAccess`` on this gate, for a drain in the same process (tests, benches)."""
        self.seam_gaps: list[float] = []
        """Seconds from the local cut to the first byte of the peer's continuation, per migration (recent)."""
        self.seams = 0
        """Migrations whose continuation reached the client (``seam_gaps`` holds the last of them)."""
        self.reprefilled_tokens = 0
        """Output tokens a peer had to prefill again (what the client had before the seam)."""
        self.metrics = metrics
        self.log = log if log is not None else structlog.stdlib.get_logger("spotguard.gate")
        self.retry_after = str(retry_after).encode()
        limits = limits or ClientLimits()
        self._read_timeout = read_timeout
        self._state = DesiredState(generation=0, draining=False, peers=tuple(peers))
        self._vm_timer: asyncio.TimerHandle | None = None
        self._handover: asyncio.TimerHandle | None = None
        self._past_deadline = False
        """The VM is about to go: relayed answers were ended, and nothing new is handed to peers."""
        self._counters: dict[tuple[str, str], Counter] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self.legs: set[Tracked] = set()
        """Every request being answered (by the engine or through peers)."""
        self.connections = ClientConnections(limits, counter=metrics.gate_limits)
        """Client connections, and the client-side limits they are held to (limits.py)."""
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @classmethod
    def from_config(cls, config: GateConfig, *, metrics: Metrics, log: structlog.stdlib.BoundLogger | None = None,
                    instance_id: str = "", engine_kind: str = "openai", holding: Holding | None = None) -> Gate:
        if not config.upstream:
            raise ConfigError("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
        return cls(upstream=config.upstream, metrics=metrics, retry_after=config.retry_after, log=log,
                   allow_paths=config.allow_paths, peers=config.peers, instance_id=instance_id,
                   engine_kind=engine_kind, holding=holding,
                   limits=ClientLimits.from_config(config).fitted(fd_limit()))

    def _peers(self, urls: tuple[str, ...]) -> Peers:
        return Peers(urls, connect_timeout=min(self._connect_timeout, PEER_CONNECT_TIMEOUT))

    # -- the declared state (from the daemon) ------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._state.draining

    @property
    def assembles(self) -> bool:
        """Non-streaming requests are asked of the engine as streams (``assemble.py``): only worth it where
        their output so far can be continued elsewhere."""
        return bool(self.peers) or self.holding is not None

    @property
    def state(self) -> DesiredState:
        return self._state

    def apply(self, state: DesiredState) -> HeldState:
        """Converge on what the daemon declares; returns what the gate now holds.

        Idempotent: the same declaration twice changes nothing, and a declaration after a daemon restart
        (the deadline rebuilt from its persisted notice) re-arms the VM deadline exactly as before.
        """
        if state.peers is not None and state.peers != self._state.peers:
            old, self.peers = self.peers, self._peers(state.peers)
            old.close()
        elif state.peers is None:
            state = dataclasses.replace(state, peers=self._state.peers)
        self._state = state
        if self._vm_timer is not None:
            self._vm_timer.cancel()
            self._vm_timer = None
        self._past_deadline = False
        if state.draining and state.vm_deadline is not None:
            delay = state.vm_deadline.timestamp() - time.time() - RELAY_END_MARGIN
            if delay <= 0:
                self._end_relays()
            else:
                self._vm_timer = asyncio.get_running_loop().call_later(delay, self._end_relays)
        if self._handover is not None:
            self._handover.cancel()
        self._handover = asyncio.get_running_loop().call_later(0, self._hand_over_late) if state.draining else None
        return self.held()

    def _hand_over_late(self) -> None:
        """While draining: hand to a peer, at once, every answer that will not finish here before the drain
        deadline (``estimate.py``); those that will stay and pay no seam. Again every ``HANDOVER_CHECK``."""
        self._handover = None
        state = self._state
        if not (state.draining and state.drain_deadline and self.peers) or self._past_deadline:
            return
        seconds = state.drain_deadline.timestamp() - time.time()
        now = asyncio.get_running_loop().time()
        late = []
        for flight in self.registry.running():
            if not flight.owner.movable():
                continue
            flight.parser.flush()
            delivered = flight.parser.content_events
            elapsed = now - flight.first_token_at if flight.first_token_at is not None else 0.0
            recent = None
            if flight.looked is not None:
                recent = (delivered - flight.looked[1], now - flight.looked[0])
            flight.looked = (now, delivered)
            rate = pace(delivered=delivered, elapsed=elapsed, recent=recent)
            if not finishes_within(limit=flight.limit, delivered=delivered, rate=rate, seconds=seconds):
                late.append(flight)
        for flight in late:
            flight.owner.interrupt(migrate=True)
        if late:
            self.log.info("gate_handed_over", requests=len(late), seconds_left=round(seconds, 3))
        if self.registry.running():
            self._handover = asyncio.get_running_loop().call_later(HANDOVER_CHECK, self._hand_over_late)

    def held(self) -> HeldState:
        return HeldState(state=self._state, inflight=self.inflight, relayed=len(self.relays()))

    def set_draining(self, draining: bool) -> None:
        """Refuse (True) or accept again (False) new requests, keeping the rest of the declared state."""
        self.apply(dataclasses.replace(self._state, draining=draining))

    def _end_relays(self) -> None:
        """Just before the VM goes: answers relayed from peers end with a retryable error, not a torn connection."""
        self._vm_timer = None
        self._past_deadline = True
        for relay in self.relays():
            relay.give_up("this replica is going away before the answer could finish; retry it")

    def relays(self) -> list[PeerRelay]:
        return [leg for leg in self.legs if isinstance(leg, PeerRelay)]

    # -- the journal (what the daemon reads and asks for) -------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests the engine is answering (journaled ones), as the drain counts them."""
        return len(self.registry.running())

    @property
    def active(self) -> int:
        """Requests being answered right now (journaled or not, by the engine or through peers)."""
        return len(self.legs)

    @property
    def background(self) -> int:
        """Tasks of the gate's own still running (connects, resumes, index writes): a stop waits for them too."""
        return len(self._tasks)

    def journal_entries(self) -> list[JournalEntry]:
        return self.registry.entries()

    def interrupt_all(self) -> list[JournalEntry]:
        """Free the engine of every journaled request still running: continued on a peer when peers are set
        and the VM is not about to go, else cut. Returns every request listed (those handed over earlier
        too), each final."""
        migrate = bool(self.peers) and not self._past_deadline
        for flight in self.registry.running():
            flight.owner.interrupt(migrate=migrate)
        return self.registry.entries()

    def release(self, request_ids: Sequence[str]) -> int:
        return self.registry.release(request_ids)

    # -- counts --------------------------------------------------------------------------------------

    def request_counts(self) -> list[tuple[str, str, int]]:
        """Requests answered since start, by (endpoint, result): what the daemon mirrors in its metrics."""
        return [(endpoint, result, n) for (endpoint, result), n in self._counts.items()]

    def limit_counts(self) -> list[tuple[str, int]]:
        """Times each client-side limit acted since start, by its ``[gate]`` key (mirrored by the daemon)."""
        return self.connections.counts()

    def count(self, endpoint: str, result: str) -> None:
        key = (endpoint, result)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self.metrics.gate_requests.labels(endpoint=endpoint, result=result)
        child.inc()
        self._counts[key] = self._counts.get(key, 0) + 1

    def index_cut(self, *, answer_id: str, holder: str, fingerprint: str, origin: Origin, output: str, tokens: int,
                  delivered: int, identity: AnswerIdentity | None, role_sent: bool, prefix: str = "") -> None:
        """Write the fleet's index entry of an answer the client will resume elsewhere (in the background,
        before the VM goes): who holds it, and what the client has."""
        holding = self.holding
        if holding is None or holding.index is None:
            return
        entry = holding.index_entry(answer_id=answer_id, holder=holder, fingerprint=fingerprint, origin=origin,
                                    output=output, tokens=tokens, delivered=delivered,
                                    identity=identity or AnswerIdentity(), role_sent=role_sent, prefix=prefix)
        vm = self._state.vm_deadline
        left = vm.timestamp() - time.time() if vm is not None else INDEX_WRITE_TIMEOUT
        self.spawn(holding.write_index(entry, max(0.5, min(INDEX_WRITE_TIMEOUT, left)), self.log), "index-write")

    def migration_stats(self) -> dict[str, Any]:
        """For the daemon's metrics: seams so far, the recent gaps (newest last), output tokens re-prefilled, and
        what the gate holds for resuming."""
        stats: dict[str, Any] = {"seams": self.seams, "seam_gaps": self.seam_gaps[-STATS_GAPS:],
                                 "reprefilled_tokens": self.reprefilled_tokens}
        holding = self.holding
        if holding is not None:
            held = holding.book.stats()
            stats["resume"] = {"answers": held.answers, "bytes": held.bytes,
                               "evictions": sorted(held.evictions.items()),
                               "index": holding.index.counts() if holding.index is not None else []}
        return stats

    # -- the one entry point of every request ----------------------------------------------------

    def handle(self, connection: ClientConnection, request: Request) -> None:
        """Called once the head of a request is in; decides what happens to it."""
        raw_path, _, query = request.target.partition(b"?")
        verdict = self._routes.check(request.method.decode("latin-1"), raw_path)
        if not verdict.allowed:  # admin endpoints and anything else outside the inference API: see routes.py
            self.count("other", "forbidden")
            request.sink = drop
            json_error(connection, request, 403, verdict.reason, "forbidden")
            return
        if verdict.raw_path != raw_path:  # what the engine would have decoded it to, and nothing else
            request.target = verdict.raw_path + (b"?" + query if query else b"")
            request.path = verdict.path
        kind = JOURNALED.get(request.path) if request.method == b"POST" else None
        if kind is not None and self.holding is not None and retry_signal(request.headers):
            Resumption(self, connection, request, kind).read_body()
            return
        self.dispatch(connection, request, kind or "other")

    def dispatch(self, connection: ClientConnection, request: Request, endpoint: str) -> None:
        """A request to answer as a new one: here, by a peer while draining, or refused."""
        kind = endpoint if endpoint in JOURNALED.values() else None
        if self._state.draining:
            forwarded = any(name.lower() == FORWARDED_HEADER for name, _ in request.headers)
            if self.peers and not forwarded and not self._past_deadline:
                # Handed to a peer as is: the load balancer has not caught up with the drain yet.
                PeerRelay.hand_off(self, connection, request, kind or "other")
                return
            self.count(kind or "other", "rejected")
            request.sink = drop
            json_error(connection, request, 503, "this replica is draining before eviction; retry on another "
                       "replica", "unavailable", retry_after=self.retry_after)
            return
        exchange = LocalExchange(self, connection, request, kind or "other")
        if kind is None:
            exchange.forward()
        else:
            exchange.read_body()

    def bad_request(self, connection: ClientConnection, status: int, message: str) -> None:
        body = error_body(message, "invalid_request" if status < 500 else "internal_error", status)
        connection.write(status_line(status) + b"content-type: application/json\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (len(body), body))

    def internal_error(self, error: BaseException) -> None:
        self.log.error("gate_internal_error", error=type(error).__name__)  # its message could quote the request

    # -- bookkeeping -------------------------------------------------------------------------------

    def track(self, leg: Tracked) -> None:
        self.legs.add(leg)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(TIMEOUT_SWEEP, self._sweep)

    def untrack(self, leg: Tracked) -> None:
        self.legs.discard(leg)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``work`` in a task the gate keeps, and cancels when it closes; a failure is logged (its type)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("gate_task_failed", task=task.get_name(), error=type(exc).__name__)

    def _sweep(self) -> None:
        """Fail requests whose target has sent nothing for ``read_timeout`` s (one timer, not one per read),
        and forget held answers whose ttl has passed."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for leg in list(self.legs):
            upstream = leg.upstream
            if upstream is None:
                continue
            if upstream.read_seen:
                upstream.read_seen, upstream.last_read = False, now
            elif now - upstream.last_read > self._read_timeout:
                leg.read_timed_out()
        holding = self.holding
        if holding is not None:
            holding.sweep(now)
        if self.legs or (holding is not None and (len(holding.book) or holding.moved)):
            self._sweeper = asyncio.get_running_loop().call_later(TIMEOUT_SWEEP, self._sweep)

    def listening(self, server: asyncio.AbstractServer) -> None:
        """A server accepting this gate's clients (``listen.run_gate``): closed with the gate."""
        self._servers.append(server)

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    async def aclose(self) -> None:
        """Stop listening, cut what is still running and close the connections to the engine."""
        self.stop_listening()
        for leg in list(self.legs):
            leg.answer.abort()
            leg.close_upstream()
            self.legs.discard(leg)
        self.connections.close()
        for task in list(self._tasks):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for timer in (self._vm_timer, self._handover):
            if timer is not None:
                timer.cancel()
        self._vm_timer = self._handover = None
        self.engine.pool.close()
        self.peers.close()
        if self.holding is not None:
            self.holding.close()
