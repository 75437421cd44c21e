"""The fleet over a schedule of evictions: every request counted once, per policy, and what it all paid.

Requests away from evictions are counted in bulk: a fleet of N replicas at utilisation u with C slots each
serves N*u*C/E[S] requests a second, each delivering its tokens once. Each evicted replica holds u*C running
requests (split into finishable and outlasting by the workload's lengths) and receives u*C/E[S] new ones a
second while the balancer still routes to it; those go through ``outcome`` individually, once per policy
and peer state on a common sample (``tables``), and each eviction weighs them by how many replicas went,
whether their peers went too (same zone or not, within one notice window) and how many balancer targets were
being evicted at the time (a retry may land on one).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from bench.sim.behaviour import Behaviour, Client, Engine
from bench.sim.outcome import Table, outcome
from bench.sim.schedule import Schedule, split_evenly
from bench.sim.workload import Request, Workload

CLASSES = ("during_drain", "finishable", "outlasting", "after_death")
"""after_death: sent to the node after the VM went, while the balancer still routed to it (bench/fleet.py
counts these among ``others``)."""


@dataclass(frozen=True)
class FleetSpec:
    gpus_per_replica: int
    concurrency: int
    """Requests one replica serves at once."""
    utilisation: float
    """Share of the slots busy on average."""
    engine: Engine
    client: Client = Client()
    peers_per_node: int = 1


@dataclass(frozen=True)
class Costs:
    on_demand_gpu_hour: float | None
    """Price of one on-demand GPU-hour, or None to report costs relative to all on-demand only."""
    spot_discount: float


@dataclass
class PolicyResult:
    policy: str
    label: str
    requests: float = 0.0
    lost: float = 0.0
    affected: float = 0.0
    generated: float = 0.0
    delivered: float = 0.0
    wasted_gpu_h: float = 0.0
    idle_gpu_h: float = 0.0
    paid_gpu_h: float = 0.0
    cost_ratio: float = 0.0
    """Cost per delivered output token against the same fleet all on-demand without evictions."""
    cost_per_mtok: float | None = None
    latency: list[tuple[float, float]] = field(default_factory=list)
    """(added seconds, weight) over affected requests that were not lost."""

    @property
    def lost_per_million(self) -> float:
        return 1e6 * self.lost / self.requests if self.requests else 0.0

    @property
    def affected_per_million(self) -> float:
        return 1e6 * self.affected / self.requests if self.requests else 0.0

    @property
    def generated_per_delivered(self) -> float:
        return self.generated / self.delivered if self.delivered else float("nan")

    @property
    def wasted_per_1000(self) -> float:
        return 1000 * (self.wasted_gpu_h + self.idle_gpu_h) / self.paid_gpu_h if self.paid_gpu_h else 0.0

    def added_latency(self, q: float) -> float:
        """The q-th percentile (0-100) of latency added to affected requests that completed."""
        if not self.latency:
            return 0.0
        ordered = sorted(self.latency)
        total = sum(w for _, w in ordered)
        running = 0.0
        for value, weight in ordered:
            running += weight
            if running >= q / 100 * total:
                return value
        return ordered[-1][0]


def sample_requests(workload: Workload, n: int, rng: random.Random, engine: Engine) -> tuple[list[Request], list[float]]:
    """``n`` requests running at a random moment (longer ones more likely, each at a uniform point of its
    life: the M/G/inf picture of a busy replica) as (request with its start, minus the notice), and ``n``
    uniform draws for arrival moments."""
    service = [r.input_tokens / engine.prefill_tokens_per_s + r.output_tokens / engine.tokens_per_s
               for r in workload.requests]
    picked = rng.choices(range(len(service)), weights=service, k=n)
    running = [Request(-rng.random() * service[i], workload.requests[i].input_tokens,
                       workload.requests[i].output_tokens, workload.requests[i].stream) for i in picked]
    return running, [rng.random() for _ in range(n)]


def tables(workload: Workload, behaviours: dict[str, Behaviour], engine: Engine, client: Client, *,
           samples: int, seed: int) -> tuple[dict[tuple[str, str, bool], Table], float]:
    """Per (policy, class, peer alive) tables over one common sample; and the share of running requests that
    could finish within the window (the same for every policy)."""
    rng = random.Random(f"{seed}:requests")
    running, moments = sample_requests(workload, samples, rng, engine)
    fresh = [rng.choice(workload.requests) for _ in range(samples)]
    window = next(iter(behaviours.values())).window_s
    finishable = [r.sent_s + r.input_tokens / engine.prefill_tokens_per_s + r.output_tokens / engine.tokens_per_s
                  <= window for r in running]
    out: dict[tuple[str, str, bool], Table] = {}
    for policy, behaviour in behaviours.items():
        for alive in ((True, False) if behaviour.peers else (True,)):
            # Every policy draws the same jitter (common random numbers): policies differ only by what they do.
            local = random.Random(f"{seed}:outcomes:{alive}")
            for cls in CLASSES:
                out[policy, cls, alive] = Table()
            for req, can_finish in zip(running, finishable, strict=True):
                out[policy, "finishable" if can_finish else "outlasting", alive].add(
                    req, outcome(req, behaviour, engine, client, peer_alive=alive, rng=local))
            drain_until = min(behaviour.lb_stop_s, window)
            dead_for = max(0.0, behaviour.lb_stop_s - window)
            for req, at in zip(fresh, moments, strict=True):
                sent = Request(at * drain_until, req.input_tokens, req.output_tokens, req.stream)
                out[policy, "during_drain", alive].add(
                    sent, outcome(sent, behaviour, engine, client, peer_alive=alive, rng=local))
                if dead_for > 0:
                    late = Request(window + at * dead_for, req.input_tokens, req.output_tokens, req.stream)
                    out[policy, "after_death", alive].add(
                        late, outcome(late, behaviour, engine, client, peer_alive=alive, rng=local))
            for cls in CLASSES:
                out[policy, cls, alive].finish()
    return out, sum(finishable) / len(finishable)


@dataclass
class _Exposure:
    """Sums over evictions of replicas whose peers lived (or did not), and of them weighted by b and b^2
    (b: the share of balancer targets being evicted then)."""

    nodes: float = 0.0
    by_bad: dict[int, float] = field(default_factory=dict)

    def add(self, nodes: float, bad: float, max_retries: int) -> None:
        self.nodes += nodes
        for retries in range(1, max_retries + 1):
            self.by_bad[retries] = self.by_bad.get(retries, 0.0) + nodes * bad**retries


def _exposures(schedule: Schedule, behaviours: dict[str, Behaviour], spec: FleetSpec
               ) -> dict[tuple[str, bool], _Exposure]:
    shares = split_evenly(schedule.replicas, len(schedule.zones))
    times = [e.at_s for e in schedule.evictions]
    zone_prefix = [[0] * (len(times) + 1) for _ in shares]
    all_prefix = [0] * (len(times) + 1)
    for i, e in enumerate(schedule.evictions):
        for z in range(len(shares)):
            zone_prefix[z][i + 1] = zone_prefix[z][i] + (e.count if e.zone == z else 0)
        all_prefix[i + 1] = all_prefix[i] + e.count
    window = schedule.window_s
    out: dict[tuple[str, bool], _Exposure] = {}
    m = spec.peers_per_node
    for e in schedule.evictions:
        lo, hi = bisect.bisect_left(times, e.at_s - window), bisect.bisect_right(times, e.at_s + window)
        near_all = all_prefix[hi] - all_prefix[lo]
        near_zone = zone_prefix[e.zone][hi] - zone_prefix[e.zone][lo]
        bad = min(1.0, near_all / schedule.replicas)
        share = shares[e.zone]
        dead_same = 1.0 if share <= 1 else min(1.0, (near_zone - 1) / (share - 1)) ** m
        others = schedule.replicas - share
        dead_cross = 1.0 if others <= 0 else min(1.0, (near_all - near_zone) / others) ** m
        for policy, behaviour in behaviours.items():
            dead = {"zone": dead_same, "cross": dead_cross}.get(behaviour.peers, 0.0)
            for alive, part in ((True, 1.0 - dead), (False, dead)):
                if part > 0:
                    out.setdefault((policy, alive), _Exposure()).add(e.count * part, bad, spec.client.max_retries)
    return out


def simulate(schedule: Schedule, workload: Workload, behaviours: dict[str, Behaviour], spec: FleetSpec,
             costs: Costs, *, samples: int = 4000, seed: int = 1) -> list[PolicyResult]:
    """Every policy over the same schedule and the same request sample."""
    engine = spec.engine
    table, finishable_share = tables(workload, behaviours, engine, spec.client, samples=samples, seed=seed)
    exposures = _exposures(schedule, behaviours, spec)
    mean_service = workload.mean_service_s(engine.tokens_per_s, engine.prefill_tokens_per_s)
    mean_output = sum(r.output_tokens for r in workload.requests) / len(workload.requests)
    running = spec.utilisation * spec.concurrency
    arrivals = running / mean_service  # per replica per second
    requests = schedule.replicas * arrivals * schedule.duration_s
    gpus = spec.gpus_per_replica
    paid_gpu_h = (schedule.spot_replica_s + schedule.on_demand_replica_s) * gpus / 3600
    token_gpu_s = gpus / (engine.tokens_per_s * spec.concurrency)
    prefill_gpu_s = gpus / engine.prefill_tokens_per_s
    results = []
    for policy, behaviour in behaviours.items():
        result = PolicyResult(policy, behaviour.label, requests=requests, generated=requests * mean_output,
                              delivered=requests * mean_output, paid_gpu_h=paid_gpu_h)
        per_node = {"finishable": running * finishable_share, "outlasting": running * (1 - finishable_share),
                    "during_drain": arrivals * min(behaviour.lb_stop_s, behaviour.window_s),
                    "after_death": arrivals * max(0.0, behaviour.lb_stop_s - behaviour.window_s)}
        wasted_tokens = reprefill = 0.0
        for alive in (True, False):
            exposure = exposures.get((policy, alive))
            if exposure is None or exposure.nodes == 0:
                continue
            busy = 0.0
            for cls, count in per_node.items():
                t = table[policy, cls, alive]
                n = exposure.nodes * count
                risky = sum(share * exposure.by_bad.get(k, 0.0) for k, share in t.at_risk.items()) * count
                lost = n * t.lost + risky
                result.lost += lost
                result.affected += n * t.affected
                # A retry lost on another evicted node is never generated elsewhere nor delivered.
                result.generated += n * (t.generated - t.output) - risky * t.output
                result.delivered -= n * (t.output - t.delivered) + risky * t.output
                wasted_tokens += n * (t.generated - t.delivered)
                reprefill += n * t.reprefill
                busy += count * t.busy_s
                if t.added_s:
                    weight = n * (t.affected - t.lost) / len(t.added_s)
                    result.latency += [(value, weight) for value in t.added_s]
            idle_slot_s = max(0.0, running * behaviour.window_s - busy)
            result.idle_gpu_h += exposure.nodes * idle_slot_s * gpus / spec.concurrency / 3600
        result.wasted_gpu_h = (wasted_tokens * token_gpu_s + reprefill * prefill_gpu_s) / 3600
        _price(result, schedule, costs, requests * mean_output)
        results.append(result)
    return results


def _price(result: PolicyResult, schedule: Schedule, costs: Costs, demand_tokens: float) -> None:
    """Cost per delivered token, with the wasted GPU time bought on top, against all on-demand."""
    spot_share = schedule.spot_replica_s / (schedule.replicas * schedule.duration_s)
    od_share = schedule.on_demand_replica_s / (schedule.replicas * schedule.duration_s)
    bill = spot_share * (1 - costs.spot_discount) + od_share
    waste = (result.wasted_gpu_h + result.idle_gpu_h) / result.paid_gpu_h if result.paid_gpu_h else 0.0
    result.cost_ratio = bill * (1 + waste) * demand_tokens / result.delivered if result.delivered else float("nan")
    if costs.on_demand_gpu_hour is not None:
        # All on-demand: every paid GPU-hour at the on-demand price, every demanded token delivered.
        per_token = result.paid_gpu_h * costs.on_demand_gpu_hour / demand_tokens
        result.cost_per_mtok = 1e6 * per_token * result.cost_ratio
