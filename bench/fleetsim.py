"""Fleet figures: what spotguard saves on 100 to 1,000 GPUs, from interruption traces and measured node behaviour.

    .venv/bin/python bench/fleetsim.py --trace ~/spothedge_ae/data/AWS3 --gpus 1000 --days 30 \\
        --workload AzureLLMInferenceTrace_conv.csv --svg fleet.svg --json fleet.json
    .venv/bin/python bench/fleetsim.py --bucket "5-10%" --cloud gcp --gpus 100
    .venv/bin/python bench/fleetsim.py --validate --fleet-json bench/data/fleet.json
    .venv/bin/python bench/fleetsim.py --trace-stats --trace ~/spothedge_ae/data/GCP1

Evictions come from a public trace (the SkyServe/SpotHedge artifact's format, read from where you keep it) or
are drawn from the AWS Spot Instance Advisor's monthly interruption buckets. What a node does at an eviction
comes from measurements: bench/migrate.py (peers), bench/detect.py (detection) and, when given, bench/fleet.py
(the load balancer's timing, and the 3-node check). Policies side by side: no spotguard, spotguard without
peers, peers in the same zone, peers across zones, and peers + resume (with a resume measurement).
docs/fleet.md explains every input and its source.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.sim import picture, report, synthetic, traces, workload  # noqa: E402
from bench.sim.behaviour import (  # noqa: E402
    POLICIES,
    SIGTERM_AT_NOTICE,
    Client,
    Engine,
    Measured,
    behaviours,
    health_delay_s,
)
from bench.sim.errors import SimInputError  # noqa: E402
from bench.sim.fleet import Costs, FleetSpec, simulate  # noqa: E402
from bench.sim.measured import load_detect, load_fleet, load_migrate  # noqa: E402
from bench.sim.schedule import Schedule  # noqa: E402
from bench.sim.validate import measured_pieces, validate  # noqa: E402

DATA = REPO / "bench" / "data"
SYNTHETIC_DAYS = 3650
SPOT_DISCOUNT = 0.60
"""The low end of the 60-91 % Spot VM discount Google publishes (https://cloud.google.com/skus); pass your
instance type's own figure (AWS: Spot Instance Advisor, "savings over On-Demand")."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_argument_group("evictions")
    source.add_argument("--trace", type=Path, help="SpotHedge-format trace: a directory of per-zone .json files")
    source.add_argument("--bucket", choices=list(synthetic.BUCKETS), help="synthetic: Spot Instance Advisor bucket")
    source.add_argument("--monthly-rate", type=float, help="synthetic: chance a replica is interrupted in a month")
    source.add_argument("--cloud", choices=("aws", "gcp", "azure"), help="sets the notice window (trace: guessed "
                        "from its directory name; synthetic: aws)")
    source.add_argument("--days", type=float, help="simulated days (trace: all of it; synthetic: 3650, so that rare "
                        "zone-wide events average out)")
    source.add_argument("--zones", type=int, default=3, help="synthetic: zones the fleet spreads over")
    source.add_argument("--zone-share", type=float, help="synthetic: share of evictions that are zone-wide "
                        "(default: measured on the public traces, per cloud)")
    source.add_argument("--zone-fraction", type=float, help="synthetic: fraction of a zone one such event takes")
    source.add_argument("--independent", action="store_true", help="trace: each eviction at its own moment "
                        "instead of a zone's drop at once")
    fleet = p.add_argument_group("fleet and workload")
    fleet.add_argument("--gpus", type=int, default=1000)
    fleet.add_argument("--gpus-per-replica", type=int, default=1)
    fleet.add_argument("--concurrency", type=int, default=16, help="requests one replica serves at once")
    fleet.add_argument("--utilisation", type=float, default=0.6, help="share of those slots busy on average")
    fleet.add_argument("--tokens-per-s", type=float, default=30.0, help="decode speed of one stream")
    fleet.add_argument("--prefill-tokens-per-s", type=float, default=5000.0, help="a replica's prompt throughput")
    fleet.add_argument("--workload", type=Path, help="request lengths: Azure LLM trace CSV or JSON lines "
                       "(default: exponential lengths with the Azure conversation trace's means)")
    fleet.add_argument("--stream-share", type=float, default=1.0, help="share of clients that stream")
    fleet.add_argument("--output-scale", type=float, default=1.0, help="what if answers were this many times longer")
    fleet.add_argument("--health-interval", type=float, help="balancer health-check interval, s (default: the bench's)")
    fleet.add_argument("--health-fall", type=int, help="failed checks before a node is out (default: the bench's)")
    fleet.add_argument("--peers-per-node", type=int, default=1)
    fleet.add_argument("--engine-shutdown-timeout", type=float, help="no spotguard, where the OS shutdown starts "
                       "at the notice (GCP): seconds the engine lets running requests go on after SIGTERM "
                       "(default: the whole window, as bench/fleet.py; vLLM's own default is 0)")
    fleet.add_argument("--no-lb-redispatch", action="store_true", help="the balancer does not retry a failed "
                       "connection on another node itself (HAProxy option redispatch does)")
    measured = p.add_argument_group("measured node behaviour")
    measured.add_argument("--fleet-json", type=Path, help="bench/fleet.py --json (default: bench/data/fleet.json "
                          "when committed)")
    measured.add_argument("--migrate-json", type=Path, default=DATA / "migrate.json")
    measured.add_argument("--detect-json", type=Path, default=DATA / "detect.json")
    measured.add_argument("--resume-json", type=Path, help="bench/fleet.py --json of a run with resume: adds the "
                          "resume policy")
    money = p.add_argument_group("costs")
    money.add_argument("--spot-discount", type=float, default=SPOT_DISCOUNT)
    money.add_argument("--on-demand-price", type=float, help="USD per on-demand GPU-hour (for $/M tokens)")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, dest="json_out")
    out.add_argument("--svg", type=Path)
    out.add_argument("--seed", type=int, default=1)
    out.add_argument("--samples", type=int, default=4000, help="requests sampled per class and policy")
    out.add_argument("--policies", default=",".join(POLICIES))
    out.add_argument("--validate", action="store_true", help="check the model against --fleet-json and exit")
    out.add_argument("--trace-stats", action="store_true", help="print --trace's correlation figures and exit")
    return p.parse_args(argv)


def _schedule(args: argparse.Namespace, replicas: int) -> Schedule:
    rng = random.Random(f"{args.seed}:schedule")
    duration = args.days * 86400 if args.days else None
    if args.trace:
        trace = traces.load_spothedge(args.trace, args.cloud)
        return traces.to_schedule(trace, replicas, rng=rng, correlated=not args.independent, duration_s=duration)
    if args.bucket is None and args.monthly_rate is None:
        raise SimInputError("give --trace DIR, --bucket or --monthly-rate")
    cloud = args.cloud or "aws"
    monthly = args.monthly_rate if args.monthly_rate is not None else synthetic.monthly_probability(args.bucket)
    share, fraction = synthetic.ZONE_CORRELATION[cloud]
    return synthetic.synthetic_schedule(
        cloud=cloud, zones=args.zones, replicas=replicas, monthly=monthly,
        duration_s=duration or SYNTHETIC_DAYS * 86400, rng=rng, zone_share=share if args.zone_share is None else args.zone_share,
        zone_fraction=fraction if args.zone_fraction is None else args.zone_fraction,
        label=f"bucket {args.bucket} ({monthly:.1%} a month)" if args.bucket else "")


def _measured(args: argparse.Namespace, cloud: str) -> tuple[Measured, dict[str, Any]]:
    """The measured pieces, and where each came from (for the JSON and the docs)."""
    migrate = load_migrate(args.migrate_json)
    detect = load_detect(args.detect_json)
    if cloud not in detect:
        raise SimInputError(f"{args.detect_json}: no detection figure for {cloud}")
    fleet_json = args.fleet_json or (DATA / "fleet.json" if (DATA / "fleet.json").exists() else None)
    bench = load_fleet(fleet_json) if fleet_json else None
    inter, fall = bench.health if bench else (1.0, 3)
    inter = args.health_interval or inter
    fall = args.health_fall or fall
    if bench:
        # The bench's balancer timing, moved to this fleet's health checks.
        after_ready = (measured_pieces(bench, migrate).lb_after_ready_s + health_delay_s(inter, fall)
                       - health_delay_s(*bench.health))
    else:
        after_ready = health_delay_s(inter, fall)
    resume = None
    if args.resume_json:
        resume_bench = load_fleet(args.resume_json)
        resume = measured_pieces(resume_bench, migrate).resume_delay_s
        if resume is None:
            raise SimInputError(f"{args.resume_json}: no outlasting request completed: no resume delay to read")
    pieces = Measured(detect[cloud], inter, fall, max(0.0, after_ready), migrate.refused_without_peers,
                      migrate.handed_ok, migrate.migrated_ok, migrate.seam_s, resume)
    sources = {"migrate_json": str(args.migrate_json), "detect_json": str(args.detect_json),
               "fleet_json": str(fleet_json) if fleet_json else None,
               "resume_json": str(args.resume_json) if args.resume_json else None,
               "balancer": "measured by bench/fleet.py" if bench else "health-check model (no bench/fleet.py JSON)"}
    return pieces, sources


def run(args: argparse.Namespace) -> int:
    if args.trace_stats:
        if not args.trace:
            raise SimInputError("--trace-stats needs --trace")
        trace = traces.load_spothedge(args.trace, args.cloud)
        share, fraction = traces.correlation(trace)
        print(f"{trace.source}: {len(trace.zones)} zones, {trace.slots} slots of {trace.gap_s:g} s "
              f"({(trace.slots - 1) * trace.gap_s / 86400:.1f} days), target {trace.target} per zone; "
              f"{share:.2f} of evicted instances left in drops of 2 or more, each taking {fraction:.2f} of the live "
              "zone on average")
        return 0
    if args.validate:
        fleet_json = args.fleet_json or DATA / "fleet.json"
        classes, tokens = validate(load_fleet(fleet_json), load_migrate(args.migrate_json), seed=args.seed)
        print(report.validation_table(classes, tokens))
        return 0 if all(c.ok for c in classes) and all(t.ok for t in tokens) else 1
    began = time.monotonic()
    if args.gpus % args.gpus_per_replica:
        raise SimInputError("--gpus must be a multiple of --gpus-per-replica")
    replicas = args.gpus // args.gpus_per_replica
    schedule = _schedule(args, replicas)
    rng = random.Random(f"{args.seed}:workload")
    if args.workload:
        requests = workload.load(args.workload, stream_share=args.stream_share, rng=rng)
    else:
        mean_in, mean_out = workload.AZURE_CONV_MEANS
        requests = workload.exponential(mean_input=mean_in, mean_output=mean_out, n=20000,
                                        stream_share=args.stream_share, rng=rng)
    requests = requests.scaled(args.output_scale)
    pieces, sources = _measured(args, schedule.cloud)
    policies = tuple(p for p in args.policies.split(",") if p)
    if "resume" in policies and pieces.resume_delay_s is None:
        policies = tuple(p for p in policies if p != "resume")
        print("(peers + resume not shown: no resume measurement; pass --resume-json)", file=sys.stderr)
    shutdown = schedule.window_s if args.engine_shutdown_timeout is None else args.engine_shutdown_timeout
    timelines = behaviours(pieces, schedule.window_s, sigterm_at_notice=SIGTERM_AT_NOTICE[schedule.cloud],
                           engine_shutdown_timeout_s=shutdown, lb_redispatch=not args.no_lb_redispatch,
                           policies=policies)
    spec = FleetSpec(args.gpus_per_replica, args.concurrency, args.utilisation,
                     Engine(args.tokens_per_s, args.prefill_tokens_per_s), Client(), args.peers_per_node)
    costs = Costs(args.on_demand_price, args.spot_discount)
    results = simulate(schedule, requests, timelines, spec, costs, samples=args.samples, seed=args.seed)
    took = time.monotonic() - began
    line = report.summary(schedule)
    assumed = (f"{args.gpus} GPUs ({args.gpus_per_replica} per replica), {args.concurrency} slots at "
               f"{args.utilisation:.0%}, {args.tokens_per_s:g} tokens/s per stream, {requests.source}, "
               f"{requests.stream_share:.0%} streaming, spot discount {args.spot_discount:.0%}")
    print(line)
    print(f"assumed: {assumed}")
    print(report.table(results))
    print(f"({took:.1f} s)")
    inputs = {"command": " ".join(sys.argv), "assumed": assumed, "measured": sources, "seconds": took,
              "timelines": {name: {"refuses_at_s": b.refuses_at_s, "cut_at_s": b.cut_at_s, "lb_stop_s": b.lb_stop_s}
                            for name, b in timelines.items()}}
    if args.json_out:
        args.json_out.write_text(json.dumps(report.as_json(schedule, results, inputs), indent=1))
    if args.svg:
        args.svg.write_text(picture.render(results, f"spotguard on {args.gpus:,} GPUs: what evictions cost, per policy",
                                           f"{line}. Assumed: {assumed}."))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse(argv))
    except SimInputError as exc:
        print(f"fleetsim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
