"""Detection latency, idle cost and start-up time of ``spotguard run`` against the emulator.

    .venv/bin/python bench/detect.py [--trials 200] [--idle-seconds 60]

Detection latency = notice raised in the emulator -> the daemon's /readyz answers 503. Each cloud runs at
default settings; the baseline in the same run is the same daemon polling AWS every 2 s, the fixed cadence
of the widely used Kubernetes handler. Between trials the notice is withdrawn and the node undrained
through the control socket.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import back_to_serving, daemon, proc_cpu_seconds, proc_rss_mb, summary, wait_status  # noqa: E402
from spotguard.emulator import EmulatorApp, EmulatorControl, run_emulator  # noqa: E402

NOTICES = {
    "aws": ("spot", {"action": "terminate", "in_seconds": 120}),
    "gcp": ("preempted", {}),
    "azure": ("event", {"event_type": "Preempt", "not_before_in_seconds": 30}),
}


def cloud_sections(cloud: str, emu_url: str, poll: float) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "agent": {"cloud": cloud, "poll_interval": poll},
        cloud: {"metadata_url": emu_url},
    }
    if cloud == "azure":
        sections["azure"]["vm_name"] = "spotguard-vm"
    return sections


async def trial_run(emu: EmulatorControl, emu_url: str, cloud: str, poll: float, trials: int) -> dict[str, Any]:
    latencies: list[float] = []
    with daemon(cloud_sections(cloud, emu_url, poll)) as d:
        async with httpx.AsyncClient(timeout=2.0) as http:
            ready_at = await wait_status(http, d.url + "/readyz", 200, timeout=30)
            startup = ready_at - d.spawned_at
            kind, params = NOTICES[cloud]
            for _ in range(trials):
                await anyio.sleep(random.uniform(0.05, 0.3))  # random phase against the poll cadence
                raised = time.perf_counter()
                event_id = await emu.raise_notice(cloud, kind, **params)
                seen = await wait_status(http, d.url + "/readyz", 503, timeout=poll * 3 + 5)
                latencies.append(seen - raised)
                await back_to_serving(http, d, functools.partial(emu.withdraw, cloud, event_id))
    return {"cloud": cloud, "poll_interval": poll, "startup_s": startup, **summary(latencies)}


async def idle_run(emu_url: str, cloud: str, seconds: float) -> dict[str, Any]:
    with daemon(cloud_sections(cloud, emu_url, 1.0)) as d:
        async with httpx.AsyncClient(timeout=2.0) as http:
            await wait_status(http, d.url + "/readyz", 200, timeout=30)
        await anyio.sleep(2)  # let imports and first polls settle before measuring idle
        cpu0, t0 = proc_cpu_seconds(d.proc.pid), time.perf_counter()
        await anyio.sleep(seconds)
        cpu1, t1 = proc_cpu_seconds(d.proc.pid), time.perf_counter()
        return {"cloud": cloud, "idle_seconds": t1 - t0, "cpu_percent_of_core": 100 * (cpu1 - cpu0) / (t1 - t0),
                "rss_mb": proc_rss_mb(d.proc.pid)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--runs", default="aws:1,aws:2,azure:1,gcp:1",
                        help="cloud:poll_interval pairs to run, in order (aws:2 is the baseline)")
    parser.add_argument("--out", default="bench/results/detect.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"runs": []}
    async with anyio.create_task_group() as tg:
        bound = await tg.start(run_emulator, "127.0.0.1", 0, EmulatorApp())
        async with EmulatorControl(bound.url) as emu:
            for item in filter(None, args.runs.split(",")):
                cloud, poll_text = item.split(":")
                poll = float(poll_text)
                run = await trial_run(emu, bound.url, cloud, poll, args.trials)
                label = f"{cloud} poll {poll:g}s" + (" (baseline: anchor cadence)" if poll == 2.0 else "")
                print(f"{label:40s} n={run['n']} p50={run['p50'] * 1000:.0f} ms p99={run['p99'] * 1000:.0f} ms "
                      f"startup={run['startup_s']:.2f} s", flush=True)
                results["runs"].append(run)
            results["idle"] = []
            for cloud in ("aws", "gcp", "azure") if args.idle_seconds > 0 else ():
                idle = await idle_run(bound.url, cloud, args.idle_seconds)
                print(f"idle {cloud} over {idle['idle_seconds']:.0f} s: cpu {idle['cpu_percent_of_core']:.2f}% of one "
                      f"core, rss {idle['rss_mb']:.1f} MB", flush=True)
                results["idle"].append(idle)
        tg.cancel_scope.cancel()
    by_run = {(r["cloud"], r["poll_interval"]): r for r in results["runs"]}
    if ("aws", 1.0) in by_run and ("aws", 2.0) in by_run:
        ours, base = by_run["aws", 1.0], by_run["aws", 2.0]
        print(f"ratio p50 ours/baseline: {ours['p50'] / base['p50']:.2f}, p99: {ours['p99'] / base['p99']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
