"""The simulator against ``bench/fleet.py``'s own measurement: 3 nodes, one eviction, class by class.

Each measured round is replayed request by request through ``outcome`` with the bench's setup (its window,
engine speed, health checks, client retries) and the measured timeline of its variant; the prediction per
class must fall within the measurement's own spread: the range of the per-round loss rates, or the
sampling error of one round (1.96 standard errors of a binomial, at least one request in that class),
whichever is wider. The sampling error is the 95 % Wilson score interval of the pooled rate at one round's
size (it stays sensible at 0 or 2 requests, where the normal approximation gives nothing).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, replace

from bench.sim.behaviour import Behaviour, Client, Engine, Measured, behaviours
from bench.sim.measured import CLASSES, FleetBench, MigrateBench, Round
from bench.sim.outcome import outcome

PREFILL_TOKENS_PER_S = 1e6
"""The bench's engines answer prompts at once: prefill is not part of what it measures."""
VARIANT_POLICY = {"baseline": "none"}
REPEATS = 50


@dataclass(frozen=True)
class ClassCheck:
    variant: str
    cls: str
    total: float
    measured_lost: tuple[int, ...]
    predicted_lost: float
    allowed: tuple[float, float]
    """The loss rates (lost / total) within the measurement's spread."""

    @property
    def measured_rate(self) -> float:
        return sum(self.measured_lost) / (self.total * len(self.measured_lost)) if self.total else 0.0

    @property
    def predicted_rate(self) -> float:
        return self.predicted_lost / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.allowed[0] - 1e-9 <= self.predicted_rate <= self.allowed[1] + 1e-9


def wilson(rate: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate observed over ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class TokenCheck:
    variant: str
    measured: tuple[float, ...]
    predicted: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return abs(self.predicted - statistics.mean(self.measured)) <= self.tolerance + 1e-9


def measured_pieces(bench: FleetBench, migrate: MigrateBench, variant: str = "spotguard") -> Measured:
    """The bench's timeline: notice -> the balancer stops sending (measured), split into detection and the
    health checks' share by the health-check model."""
    inter, fall = bench.health
    lb_down = bench.lb_down_after_s(variant)
    delay = (fall - 0.5) * inter
    if lb_down is None:
        lb_down = float(bench.setup.get("detect_s", 0.0)) + delay
    detect = float(bench.setup.get("detect_s", max(0.0, lb_down - delay)))
    seams = bench.seam_gaps_s()
    return Measured(detect, inter, fall, max(0.0, lb_down - detect), migrate.refused_without_peers,
                    migrate.handed_ok, migrate.migrated_ok, statistics.median(seams) if seams else migrate.seam_s,
                    resume_delay_s=_resume_delay(bench, variant) if bench.resumable(variant) else None)


def _resume_delay(bench: FleetBench, variant: str) -> float | None:
    """Median latency added to requests that outlasted the window and still completed (they were resumed)."""
    added = [r.latency_s - r.request.output_tokens / bench.tokens_per_s
             for round_ in bench.variants.get(variant, ()) for r in round_.requests
             if r.cls == "outlasting" and r.request.stream and not r.lost and r.latency_s is not None]
    return max(0.0, statistics.median(added)) if added else None


def _timeline(bench: FleetBench, measured: Measured, variant: str) -> Behaviour:
    """bench/fleet.py's variants: ``baseline`` is no spotguard with the engine told to stop at the notice
    (systemd's SIGTERM, as on GCP); ``spotguard`` has ``[gate] peers`` (the balancer, never evicted with the
    node) and a snapshot store, and resume where the round's streams went through the resumable client."""
    if variant == "spotguard":
        policy = "resume" if measured.resume_delay_s is not None else "peers-cross"
    else:
        policy = VARIANT_POLICY.get(variant, variant)
    timeline = behaviours(measured, bench.window_s, sigterm_at_notice=True,
                          engine_shutdown_timeout_s=bench.engine_shutdown_timeout_s,
                          lb_redispatch=bench.lb_redispatch, snapshot=True, policies=(policy,))[policy]
    # The bench's peer is the balancer: until it takes the node out, it sends a continuation back here a
    # round-robin share of the time.
    return replace(timeline, peer_miss=1 / bench.nodes) if timeline.peers else timeline


def _replay(round_: Round, behaviour: Behaviour, engine: Engine, client: Client, nodes: int,
            rng: random.Random, repeats: int = REPEATS) -> tuple[dict[str, float], float, float]:
    """Expected lost per class, tokens generated and delivered, for one measured round (the mean over
    ``repeats`` draws of the jitter and of which hand-offs land back on the node)."""
    lost = dict.fromkeys(CLASSES, 0.0)
    generated = delivered = 0.0
    bad = 1 / nodes  # a retry lands on the evicted node with the balancer's round-robin share
    for item in round_.requests:
        req = item.request
        if item.cls in ("finishable", "outlasting"):
            on_evicted = 1.0
        elif req.sent_s >= 0 and req.sent_s < behaviour.lb_stop_s:
            on_evicted = 1 / nodes  # the balancer still sends this node its round-robin share
        else:
            on_evicted = 0.0
        for _ in range(repeats):
            result = outcome(req, behaviour, engine, client, peer_alive=True, rng=rng)
            risky = bad**result.at_risk if result.at_risk else 0.0
            lost_p = on_evicted * (float(result.lost) + (1 - float(result.lost)) * risky)
            lost[item.cls] += lost_p / repeats
            generated += (on_evicted * result.generated + (1 - on_evicted) * req.output_tokens) / repeats
            delivered += (1 - lost_p) * req.output_tokens / repeats
    return lost, generated, delivered


def validate(bench: FleetBench, migrate: MigrateBench, *, seed: int = 1) -> tuple[list[ClassCheck], list[TokenCheck]]:
    """Class-by-class and token checks of every variant of a ``bench/fleet.py`` run."""
    measured = measured_pieces(bench, migrate)
    engine = Engine(bench.tokens_per_s, PREFILL_TOKENS_PER_S)
    client = Client(max_retries=int(bench.setup.get("max_retries", Client().max_retries)),
                    retry_after_s=float(bench.setup.get("retry_after_s", Client().retry_after_s)))
    classes: list[ClassCheck] = []
    tokens: list[TokenCheck] = []
    for variant, rounds in bench.variants.items():
        timeline = _timeline(bench, measured, variant)
        rng = random.Random(f"{seed}:{variant}")
        replays = [_replay(r, timeline, engine, client, bench.nodes, rng) for r in rounds]
        for cls in CLASSES:
            totals = [r.classes[cls].total for r in rounds]
            rates = [r.classes[cls].lost / r.classes[cls].total for r in rounds if r.classes[cls].total]
            mean_total = statistics.mean(totals)
            pooled = sum(r.classes[cls].lost for r in rounds) / max(1, sum(totals))
            low, high = wilson(pooled, mean_total)
            allowed = (min([low, *rates]), max([high, *rates]))
            predicted = statistics.mean(lost[cls] for lost, _, _ in replays)
            classes.append(ClassCheck(variant, cls, mean_total, tuple(r.classes[cls].lost for r in rounds),
                                      predicted, allowed))
        ratios = [r.tokens_generated / r.tokens_delivered for r in rounds if r.tokens_delivered]
        predicted_ratio = statistics.mean(g / d for _, g, d in replays if d)
        per_request = max(r.request.output_tokens for rd in rounds for r in rd.requests) / max(
            1, min(r.tokens_delivered for r in rounds))
        tokens.append(TokenCheck(variant, tuple(ratios), predicted_ratio,
                                 max(max(ratios) - min(ratios), per_request) if ratios else 0.0))
    return classes, tokens
