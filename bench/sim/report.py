"""The simulator's figures as a table (stdout) and as JSON (``--json``)."""

from __future__ import annotations

from typing import Any

from bench.sim.fleet import PolicyResult
from bench.sim.schedule import Schedule
from bench.sim.validate import ClassCheck, TokenCheck

HEADERS = ("policy", "lost /M req", "touched /M req", "tokens gen/deliv", "added p50", "added p99",
           "GPU-h wasted /1000 (idle)", "cost vs on-demand", "$/M tokens")


def seconds(value: float) -> str:
    """Milliseconds below a second, else seconds with one decimal."""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def row(result: PolicyResult) -> tuple[str, ...]:
    idle = 1000 * result.idle_gpu_h / result.paid_gpu_h if result.paid_gpu_h else 0.0
    return (result.label, f"{result.lost_per_million:.1f}", f"{result.affected_per_million:.1f}",
            f"{result.generated_per_delivered:.5f}", seconds(result.added_latency(50)),
            seconds(result.added_latency(99)), f"{result.wasted_per_1000:.2f} ({idle:.2f})",
            f"{result.cost_ratio:.3f}", "-" if result.cost_per_mtok is None else f"{result.cost_per_mtok:.3f}")


def table(results: list[PolicyResult]) -> str:
    """A Markdown table, one row per policy (it reads as plain text too)."""
    rows = [HEADERS, *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary(schedule: Schedule) -> str:
    days = schedule.duration_s / 86400
    spot = schedule.spot_replica_s / (schedule.replicas * schedule.duration_s)
    return (f"{schedule.source}: {schedule.replicas} replicas over {days:.1f} days, {len(schedule.evictions)} "
            f"eviction events taking {schedule.replica_evictions} replicas ({schedule.replica_evictions / schedule.replicas / days * 30:.1f} "
            f"per replica-month), {schedule.cloud} notice {schedule.window_s:.0f} s, {spot:.1%} of replica-hours on spot")


def as_json(schedule: Schedule, results: list[PolicyResult], inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": "fleetsim", "version": 1, "inputs": inputs,
        "schedule": {"source": schedule.source, "cloud": schedule.cloud, "zones": list(schedule.zones),
                     "replicas": schedule.replicas, "days": schedule.duration_s / 86400,
                     "eviction_events": len(schedule.evictions), "replica_evictions": schedule.replica_evictions,
                     "spot_replica_hours": schedule.spot_replica_s / 3600,
                     "on_demand_replica_hours": schedule.on_demand_replica_s / 3600},
        "policies": [{"policy": r.policy, "label": r.label, "requests": r.requests, "lost": r.lost,
                      "lost_per_million": r.lost_per_million, "touched_per_million": r.affected_per_million,
                      "tokens_generated_per_delivered": r.generated_per_delivered,
                      "added_latency_p50_s": r.added_latency(50), "added_latency_p99_s": r.added_latency(99),
                      "gpu_hours_paid": r.paid_gpu_h, "gpu_hours_wasted_compute": r.wasted_gpu_h,
                      "gpu_hours_idle_in_drain": r.idle_gpu_h, "wasted_per_1000_gpu_hours": r.wasted_per_1000,
                      "cost_vs_on_demand": r.cost_ratio, "cost_per_million_tokens": r.cost_per_mtok}
                     for r in results],
    }


def validation_table(classes: list[ClassCheck], tokens: list[TokenCheck]) -> str:
    lines = ["| variant | class | requests per round | lost, measured per round | lost, predicted | rate measured / "
             "predicted | within the spread | ok |", "|---|---|---|---|---|---|---|---|"]
    for c in classes:
        lines.append(f"| {c.variant} | {c.cls} | {c.total:g} | {', '.join(map(str, c.measured_lost))} | "
                     f"{c.predicted_lost:.2f} | {c.measured_rate:.3f} / {c.predicted_rate:.3f} | "
                     f"{c.allowed[0]:.3f} to {c.allowed[1]:.3f} | {'yes' if c.ok else 'NO'} |")
    for t in tokens:
        lines.append(f"| {t.variant} | tokens generated / delivered | | {', '.join(f'{m:.3f}' for m in t.measured)} "
                     f"| {t.predicted:.3f} | | ± {t.tolerance:.3f} | {'yes' if t.ok else 'NO'} |")
    return "\n".join(lines)
