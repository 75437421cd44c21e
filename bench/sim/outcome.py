"""What one request sees when its node is evicted, under one policy; and tables of it per request class.

Time 0 is the notice, the VM goes at the window's end. A request either never notices, or is one of:

- cut with tokens already streamed and nothing to continue it: lost (the SDK cannot retry a stream that
  has begun); its tokens so far were generated for nothing;
- cut before its answer began, or not streaming: the client retries (after the gate's Retry-After, or the
  SDK's backoff when the connection just broke) and the answer is generated again elsewhere;
- refused while the node drains (503): retried the same way;
- handed to a peer, or continued there after a seam (the peer prefills prompt + output so far);
- resumed elsewhere from the snapshot.

A retry can land on another node being evicted while the balancer still routes to it; the share of such
nodes depends on the eviction (how many went at once), so a table keeps, per request that relies on its
retries, how many of them go out in that danger (``at_risk``) and the event weighs them in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from bench.sim.behaviour import Behaviour, Client, Engine
from bench.sim.workload import Request
from spotguard.gate.relay import SAME_PEER_TRIES

HOP_S = 0.002
"""A peer hand-off's extra hop through the gate (bench/gate.py: about a millisecond added per hop)."""


@dataclass(frozen=True)
class Outcome:
    lost: bool
    generated: int
    """Tokens generated for this request on every attempt."""
    delivered: int
    """Tokens in the answer the client keeps (0 when lost)."""
    reprefill: int
    """Tokens prefilled again: a retry's prompt, a continuation's prompt + output so far."""
    added_s: float
    """Seconds added to its latency (for requests that are not lost)."""
    affected: bool
    busy_s: float
    """Seconds it held a slot on the evicted node after the notice."""
    at_risk: int = 0
    """Retries, all sent while nodes being evicted may still be routed to: lost if every one lands on one."""


def _refused_there(behaviour: Behaviour, at: float) -> bool:
    """Would an attempt at ``at`` that the balancer sends to a node evicted at the same moment fail? Yes while
    that node refuses new work, and once it is gone unless the balancer redispatches failed connections."""
    if at >= behaviour.lb_stop_s:
        return False
    if at >= behaviour.window_s:
        return not behaviour.lb_redispatch
    return at >= behaviour.refuses_at_s


def _retried(client: Client, req: Request, behaviour: Behaviour, *, failed_at: float, server_delay: bool,
             generated_before: int, reprefill: int, busy_s: float, rng: random.Random) -> Outcome:
    """The attempt that failed at ``failed_at`` is retried; the answer is generated again elsewhere (its prompt
    prefilled again there: waste only when this node had prefilled it, ``reprefill``)."""
    delay = client.retry_after_s if server_delay else client.backoff(0, rng.random())
    at, exposed = failed_at + delay, 0
    for attempt in range(client.max_retries):
        if not _refused_there(behaviour, at):
            break
        exposed += 1
        at += client.retry_after_s if server_delay else client.backoff(attempt + 1, rng.random())
    at_risk = client.max_retries if exposed == client.max_retries else 0
    return Outcome(client.max_retries == 0, generated_before + req.output_tokens, req.output_tokens, reprefill,
                   failed_at + delay - req.sent_s, True, busy_s, at_risk)


def _cut(client: Client, req: Request, engine: Engine, behaviour: Behaviour, *, at: float, progress: int,
         reprefill: int, by_death: bool, busy_s: float, rng: random.Random) -> Outcome:
    """Cut at ``at`` with ``progress`` tokens generated, and nobody continues it here."""
    if behaviour.resume_delay_s is not None and progress > 0:
        pause = behaviour.resume_delay_s + (req.input_tokens + progress) / engine.prefill_tokens_per_s
        reprefill += req.input_tokens + progress
        if req.stream:  # the resumable client picks the stream up where it broke
            return Outcome(False, req.output_tokens, req.output_tokens, reprefill, pause, True, busy_s)
        # A plain call: the gate answers it 503 + Spotguard-Resume before the VM goes, and the SDK's own retry
        # (its retry count is a retry signal the gate knows) is answered with the whole text, continued from
        # the output so far rather than generated again: it waits the Retry-After, then as a stream would.
        retry = _retried(client, req, behaviour, failed_at=at, server_delay=True, generated_before=0,
                         reprefill=reprefill, busy_s=busy_s, rng=rng)
        return replace(retry, generated=req.output_tokens, added_s=client.retry_after_s + pause)
    if req.stream and progress > 0:
        return Outcome(True, progress, 0, reprefill, 0.0, True, busy_s)
    # The gate answers a cut request whose answer had not begun with 503 + Retry-After; a VM going away just
    # breaks the connection, and the SDK backs off on its own.
    prefilled_here = req.input_tokens if busy_s > 0 else 0
    return _retried(client, req, behaviour, failed_at=at, server_delay=behaviour.refusal_retry_after and not by_death,
                    generated_before=progress, reprefill=reprefill + prefilled_here, busy_s=busy_s, rng=rng)


def reaches_another_node(behaviour: Behaviour, at: float) -> float:
    """The chance a hand-off at ``at`` reaches a node other than this one: a peer that routes it back here (a
    balancer that has not taken this node out yet) is tried again, up to the gate's own number of tries."""
    return 1.0 - behaviour.peer_miss**SAME_PEER_TRIES if at < behaviour.lb_stop_s else 1.0


def outcome(req: Request, behaviour: Behaviour, engine: Engine, client: Client, *, peer_alive: bool,
            rng: random.Random) -> Outcome:
    """What ``req``, sent to the evicted node at ``req.sent_s`` (negative: running at the notice), goes through."""
    window = behaviour.window_s
    prefill_s = req.input_tokens / engine.prefill_tokens_per_s
    service_s = prefill_s + req.output_tokens / engine.tokens_per_s
    t0 = req.sent_s
    if t0 >= window:  # the balancer still routes to a node that is gone: the connection fails at once
        if behaviour.lb_redispatch:
            return Outcome(False, req.output_tokens, req.output_tokens, 0, 0.0, False, 0.0)
        return _retried(client, req, behaviour, failed_at=t0, server_delay=False, generated_before=0, reprefill=0,
                        busy_s=0.0, rng=rng)
    if t0 >= behaviour.refuses_at_s:
        if behaviour.peers and peer_alive and rng.random() < behaviour.handed_ok * reaches_another_node(behaviour, t0):
            end = t0 + HOP_S + service_s
            if end <= window:
                return Outcome(False, req.output_tokens, req.output_tokens, 0, HOP_S, True, 0.0)
            progress = int(max(0.0, window - t0 - HOP_S - prefill_s) * engine.tokens_per_s)
            return _cut(client, req, engine, behaviour, at=window, progress=progress, reprefill=0, by_death=True,
                        busy_s=0.0, rng=rng)
        if rng.random() < behaviour.refused_share:
            return _retried(client, req, behaviour, failed_at=t0, server_delay=behaviour.refusal_retry_after,
                            generated_before=0, reprefill=0, busy_s=0.0, rng=rng)
    end = t0 + service_s
    cut = behaviour.cut_at_s
    if behaviour.peers and peer_alive and end > behaviour.drain_deadline_s:
        cut = max(behaviour.refuses_at_s, t0)  # handed over as the drain begins: it would not finish here
    if end <= cut:
        return Outcome(False, req.output_tokens, req.output_tokens, 0, 0.0, False, max(0.0, end - max(t0, 0.0)))
    busy = max(0.0, cut - max(t0, 0.0))
    progress = int(min(req.output_tokens, max(0.0, cut - t0 - prefill_s) * engine.tokens_per_s))
    migrates = behaviour.peers and peer_alive and cut < window
    if migrates and rng.random() < behaviour.migrated_ok * reaches_another_node(behaviour, cut):
        seam = behaviour.seam_s + (req.input_tokens + progress) / engine.prefill_tokens_per_s
        finish = cut + seam + (req.output_tokens - progress) / engine.tokens_per_s
        reprefill = req.input_tokens + progress
        if finish <= window:
            return Outcome(False, req.output_tokens, req.output_tokens, reprefill, seam, True, busy)
        # The peer's answer is relayed through this node's gate, which goes with the VM.
        progress = int(min(req.output_tokens, progress + max(0.0, window - cut - seam) * engine.tokens_per_s))
        return _cut(client, req, engine, behaviour, at=window, progress=progress, reprefill=reprefill,
                    by_death=True, busy_s=busy, rng=rng)
    return _cut(client, req, engine, behaviour, at=cut, progress=progress, reprefill=0, by_death=cut >= window,
                busy_s=busy, rng=rng)


@dataclass
class Table:
    """Per-request means of one class under one policy and peer state, from a sample of requests."""

    n: int = 0
    lost: float = 0.0
    generated: float = 0.0
    delivered: float = 0.0
    output: float = 0.0
    reprefill: float = 0.0
    busy_s: float = 0.0
    affected: float = 0.0
    at_risk: dict[int, float] = field(default_factory=dict)
    """Share of requests relying on this many retries sent while evicted nodes are still routed to."""
    added_s: list[float] = field(default_factory=list)
    """Latency added to each affected request that was not lost (the sample, for percentiles)."""

    def add(self, req: Request, result: Outcome) -> None:
        self.n += 1
        self.lost += result.lost
        self.generated += result.generated
        self.delivered += result.delivered
        self.output += req.output_tokens
        self.reprefill += result.reprefill
        self.busy_s += result.busy_s
        self.affected += result.affected
        if result.at_risk:
            self.at_risk[result.at_risk] = self.at_risk.get(result.at_risk, 0.0) + 1
        if result.affected and not result.lost:
            self.added_s.append(result.added_s)

    def finish(self) -> Table:
        """Sums become per-request means."""
        n = max(self.n, 1)
        for name in ("lost", "generated", "delivered", "output", "reprefill", "busy_s", "affected"):
            setattr(self, name, getattr(self, name) / n)
        self.at_risk = {k: v / n for k, v in self.at_risk.items()}
        return self

    def lost_share(self, bad_share: float) -> float:
        """Lost per request when ``bad_share`` of the balancer's targets are nodes being evicted."""
        return self.lost + sum(share * bad_share**retries for retries, share in self.at_risk.items())
