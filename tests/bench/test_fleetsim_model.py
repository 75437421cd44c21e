"""bench/sim: what one request sees at an eviction, and the fleet's bulk counting against a request-by-request
simulation of the same fleet."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from bench.sim.behaviour import Behaviour, Client, Engine, Measured, behaviours
from bench.sim.fleet import Costs, FleetSpec, simulate
from bench.sim.outcome import Table, outcome, reaches_another_node
from bench.sim.schedule import Eviction, Schedule
from bench.sim.workload import Request, Workload, exponential
from spotguard.gate.relay import SAME_PEER_TRIES

ENGINE = Engine(tokens_per_s=20.0, prefill_tokens_per_s=10_000.0)
MEASURED = Measured(detect_s=0.8, health_inter_s=1.0, health_fall=3, lb_after_ready_s=2.5,
                    refused_without_peers=1.0, handed_ok=1.0, migrated_ok=1.0, seam_s=0.2, resume_delay_s=1.5)


def timelines(window: float = 30.0, *, sigterm: bool = False) -> dict[str, Behaviour]:
    return behaviours(MEASURED, window, sigterm_at_notice=sigterm, engine_shutdown_timeout_s=window)


def see(req: Request, policy: str, *, alive: bool = True, window: float = 30.0, sigterm: bool = False) -> tuple[bool, float]:
    result = outcome(req, timelines(window, sigterm=sigterm)[policy], ENGINE, Client(), peer_alive=alive,
                     rng=random.Random(1))
    return result.lost, result.added_s


def test_timelines_follow_the_drain_plan() -> None:
    plans = timelines(30.0)
    # 30 s window, 5 s margin, 0.8 s detection: 24.2 s left; wait_inflight keeps 2 s for the tail and half of
    # the rest for the snapshot (11.1 s; bench/migrate.py measured 11.34 s with a manual drain of the same
    # window). With peers the gate hands over at once what would not finish by the drain deadline, and the
    # wait keeps only 1 s for the snapshot's records: 21.2 s.
    assert plans["spotguard"].cut_at_s == pytest.approx(0.8 + 11.1)
    assert plans["peers-zone"].cut_at_s == pytest.approx(0.8 + 21.2)
    assert plans["peers-zone"].drain_deadline_s == pytest.approx(25.0)
    assert plans["none"].cut_at_s == 30.0 and plans["none"].lb_stop_s == pytest.approx(32.5)
    assert plans["spotguard"].lb_stop_s == pytest.approx(3.3)
    assert timelines(30.0, sigterm=True)["none"].refuses_at_s == 0.0


def test_a_stream_that_outlasts_the_window_is_lost_unless_resumed() -> None:
    long_stream = Request(-2.0, 100, 1000, True)  # 50 s of answer, 2 s in
    assert see(long_stream, "none") == (True, 0.0)
    assert see(long_stream, "spotguard")[0] is True
    assert see(long_stream, "peers-cross")[0] is True  # continued on the peer, cut when the VM goes
    lost, added = see(long_stream, "resume")  # resumed where the relay broke: the prompt and ~640 tokens again
    assert not lost and added == pytest.approx(1.5 + (100 + 640) / 10_000, abs=0.005)


def test_a_plain_call_that_outlasts_the_window_is_retried_elsewhere() -> None:
    lost, added = see(Request(-2.0, 100, 1000, False), "none")
    assert not lost and 32.0 - 0.001 <= added <= 32.5  # 30 s to the VM's end, then the SDK's 0.5 s backoff


def test_with_resume_a_plain_call_cut_at_the_end_is_continued_when_the_sdk_retries() -> None:
    """As in bench/fleet.py: 503 + Spotguard-Resume at the deadline, and the SDK's retry (after the gate's 5 s)
    is answered from the output so far; nothing is generated twice."""
    call = Request(-2.0, 100, 1000, False)
    plans = timelines()
    made_again = outcome(call, plans["peers-cross"], ENGINE, Client(), peer_alive=True, rng=random.Random(1))
    resumed = outcome(call, plans["resume"], ENGINE, Client(), peer_alive=True, rng=random.Random(1))
    assert not made_again.lost and made_again.generated > call.output_tokens
    assert not resumed.lost and resumed.generated == resumed.delivered == call.output_tokens
    assert resumed.added_s == pytest.approx(5.0 + 1.5 + (100 + 640) / 10_000, abs=0.005)


def test_a_hand_over_routed_back_by_the_balancer_is_tried_again() -> None:
    """The peer is the balancer (bench/fleet.py): while it still routes to this node, a hand-over comes back a
    third of the time, and the gate tries again (SAME_PEER_TRIES): it fails only if every try comes back."""
    plan = replace(timelines()["peers-cross"], peer_miss=1 / 3)
    assert reaches_another_node(plan, 1.0) == pytest.approx(1 - (1 / 3) ** SAME_PEER_TRIES)
    assert reaches_another_node(plan, plan.lb_stop_s + 1) == 1.0


def test_peers_keep_what_finishes_here_and_take_the_rest_at_once() -> None:
    finishable = Request(-1.0, 100, 400, True)  # 20 s of answer: done 19 s after the notice
    assert see(finishable, "none") == (False, 0.0)
    assert see(finishable, "spotguard")[0] is True  # cut at 11.9 s, its stream already begun
    assert see(finishable, "peers-zone") == (False, 0.0)  # done by the drain deadline: kept here, no seam
    longer = Request(-1.0, 100, 540, True)  # done 26 s after the notice: after the drain deadline (25 s)
    lost, seam = see(longer, "peers-zone")  # handed over as the drain begins (0.8 s), 35 tokens in
    assert not lost and seam == pytest.approx(0.2 + (100 + 35) / 10_000, abs=0.001)
    assert see(longer, "peers-zone", alive=False)[0] is True


def test_new_requests_while_draining() -> None:
    new = Request(1.5, 100, 40, True)
    assert see(new, "none") == (False, 0.0)  # AWS: the engine serves until the VM goes
    lost, added = see(new, "spotguard")
    assert not lost and added == 5.0  # the gate's 503 asks for a retry in 5 s ([gate] retry_after)
    assert see(new, "peers-cross")[1] == pytest.approx(0.002)  # handed to the peer through the gate
    lost, added = see(new, "none", sigterm=True)  # GCP: systemd's SIGTERM, the engine's own 503
    assert not lost and 0.375 <= added <= 0.5


def test_retries_that_may_land_on_another_evicted_node_are_weighed() -> None:
    # GCP without spotguard: the engine answers 503 from the notice while the balancer keeps sending it work
    # (its /health stays 200): both SDK retries go out while it still does.
    plan = timelines(30.0, sigterm=True)["none"]
    table = Table()
    req = Request(1.0, 10, 20, False)
    table.add(req, outcome(req, plan, ENGINE, Client(), peer_alive=True, rng=random.Random(1)))
    table.finish()
    assert table.lost == 0.0 and table.at_risk == {2: 1.0}
    assert table.lost_share(1 / 3) == pytest.approx(1 / 9)


def _brute_force(schedule: Schedule, work: Workload, plans: dict[str, Behaviour], spec: FleetSpec,
                 rng: random.Random) -> dict[str, float]:
    """Requests one by one: Poisson arrivals at each evicted replica around its notice, each through outcome."""
    service = [r.input_tokens / ENGINE.prefill_tokens_per_s + r.output_tokens / ENGINE.tokens_per_s
               for r in work.requests]
    mean_service = sum(service) / len(service)
    rate = spec.utilisation * spec.concurrency / mean_service
    horizon = max(service)
    lost = dict.fromkeys(plans, 0.0)
    for eviction in schedule.evictions:
        for _ in range(eviction.count):
            arrivals = []
            at = -horizon
            while True:
                at += rng.expovariate(rate)
                if at >= max(p.lb_stop_s for p in plans.values()):
                    break
                arrivals.append((at, rng.randrange(len(service))))
            for policy, plan in plans.items():
                jitter = random.Random(policy)
                for sent, index in arrivals:
                    if sent < 0 and sent + service[index] <= 0:
                        continue  # done before the notice
                    if sent >= plan.lb_stop_s:
                        continue  # the balancer no longer sends here
                    base = work.requests[index]
                    result = outcome(Request(sent, base.input_tokens, base.output_tokens, base.stream), plan, ENGINE,
                                     spec.client, peer_alive=True, rng=jitter)
                    lost[policy] += result.lost
    return lost


def test_bulk_counting_matches_a_request_by_request_simulation() -> None:
    """Every request is counted once: the bulk figures (length-biased running requests, arrivals while the
    balancer still routes to the node) agree with simulating each request, within sampling error."""
    work = exponential(mean_input=200, mean_output=200, n=3000, stream_share=0.5, rng=random.Random(2))
    window, replicas, count = 30.0, 1000, 300
    evictions = tuple(Eviction(1000.0 * (i + 1), 0, 1, replicas) for i in range(count))
    schedule = Schedule("test", "gcp", ("z",), replicas, 1000.0 * (count + 1), evictions, replicas * 1e6, 0.0)
    plans = {p: b for p, b in timelines(window).items() if p in ("none", "spotguard")}
    spec = FleetSpec(1, 8, 0.5, ENGINE)
    results = {r.policy: r for r in simulate(schedule, work, plans, spec, Costs(None, 0.6), samples=20000)}
    brute = _brute_force(schedule, work, plans, spec, random.Random(3))
    for policy, lost in brute.items():
        assert lost > 20, policy  # enough losses for the comparison to mean something
        assert results[policy].lost == pytest.approx(lost, rel=4 / lost**0.5), policy
    mean_service = work.mean_service_s(ENGINE.tokens_per_s, ENGINE.prefill_tokens_per_s)
    assert results["none"].requests == pytest.approx(replicas * 4 / mean_service * schedule.duration_s)


def test_same_seed_same_figures() -> None:
    work = exponential(mean_input=300, mean_output=300, n=2000, stream_share=0.7, rng=random.Random(5))
    schedule = Schedule("t", "aws", ("a", "b"), 100, 86400.0,
                        (Eviction(100.0, 0, 50, 50), Eviction(5000.0, 1, 1, 50)), 100 * 86400.0, 0.0)
    def figures(seed: int) -> list[tuple[float, float, float]]:
        out = simulate(schedule, work, timelines(120.0), FleetSpec(1, 16, 0.6, ENGINE), Costs(2.0, 0.6),
                       samples=2000, seed=seed)
        return [(r.lost, r.added_latency(99), r.wasted_gpu_h) for r in out]
    assert figures(1) == figures(1)
    assert figures(1) != figures(2)


def test_zone_wide_evictions_take_same_zone_peers_along() -> None:
    work = exponential(mean_input=300, mean_output=800, n=2000, stream_share=1.0, rng=random.Random(5))
    whole_zone = Schedule("t", "gcp", ("a", "b"), 100, 86400.0, (Eviction(100.0, 0, 50, 50),), 100 * 86400.0, 0.0)
    out = {r.policy: r for r in simulate(whole_zone, work, timelines(30.0), FleetSpec(1, 16, 0.6, ENGINE),
                                         Costs(None, 0.6), samples=3000)}
    # The zone's peers go too: nothing is continued; only the longer local wait (no snapshot share to keep
    # when peers are set) lets more finish than spotguard without peers does.
    assert out["peers-zone"].lost <= out["spotguard"].lost
    assert out["peers-cross"].lost < out["spotguard"].lost  # what outlasts the window is lost there too
    assert out["resume"].lost < out["peers-cross"].lost
