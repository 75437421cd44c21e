"""Detection latency, idle cost and start-up time of ``spotguard run`` against the emulator.

    .venv/bin/python bench/detect.py [--trials 200] [--idle-seconds 60]

Detection latency = notice raised in the emulator -> the daemon's /readyz answers 503. Each cloud runs at
default settings; the baseline in the same run is the same daemon polling AWS every 2 s, the fixed cadence
of the widely used Kubernetes handler. Between trials the notice is withdrawn and the node undrained
through the control socket.

``--gate-load 200`` adds a run on AWS with the gate on (``spotguard run`` starts ``spotguard gate`` in
front of a fake engine): blocks of trials rotate between an idle gate, a gate serving that many
concurrent streams back to back (a load generator in a process of its own), and the same load sent
straight to the engine (what the load generator and the engine alone cost a 2-core machine).
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

from bench._harness import (  # noqa: E402
    back_to_serving,
    daemon,
    free_port,
    proc_cpu_seconds,
    proc_rss_mb,
    summary,
    wait_status,
)
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


SPOT_PATH = "/latest/meta-data/spot/instance-action"
BLOCK = 10
"""Trials per block when idle and loaded blocks alternate."""
STREAM_BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
                          "stream": True}).encode()


async def load_forever(url: str, streams: int) -> None:
    """``streams`` clients, each streaming one answer after another through ``url`` until killed."""
    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as http:
            while True:
                try:
                    async with http.stream("POST", "/v1/chat/completions", content=STREAM_BODY) as response:
                        async for _ in response.aiter_raw():
                            pass
                except httpx.HTTPError:
                    await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        for _ in range(streams):
            tg.start_soon(client)


async def wait_gate(path: str) -> int:
    """The pid of the gate once it answers (/readyz does not wait for it yet)."""
    from spotguard.errors import GateError
    from spotguard.gate.control import call

    with anyio.fail_after(30):
        while True:
            try:
                return int((await call(path, "hello", timeout=2))["pid"])
            except GateError:
                await anyio.sleep(0.05)


async def gate_load_run(emu: EmulatorControl, emu_url: str, trials: int, streams: int) -> dict[str, Any]:
    """AWS detection with the gate idle vs serving ``streams`` streams, blocks of trials interleaved."""
    import subprocess

    from spotguard.gate.control import call

    here = Path(__file__).resolve()
    engine_port, gate_port = free_port(), free_port()
    engine = subprocess.Popen([sys.executable, str(here.with_name("gate.py")), "--serve", "engine",
                               "--port", str(engine_port)])
    sections = cloud_sections("aws", emu_url, 1.0)
    sections["gate"] = {"listen": f"127.0.0.1:{gate_port}", "upstream": f"http://127.0.0.1:{engine_port}"}
    modes = ("idle", "loaded", "direct")
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    reactions: dict[str, list[float]] = {mode: [] for mode in modes}
    """From the poll that carried the notice (the emulator's clock) to /readyz 503: the daemon's own part."""
    gate_cpu = dict.fromkeys(modes, 0.0)
    try:
        with daemon(sections) as d:
            gate_socket = str(Path(d.socket).with_name("gate.sock"))
            async with httpx.AsyncClient(timeout=2.0) as http:
                await wait_status(http, d.url + "/readyz", 200, timeout=30)
                gate_pid = await wait_gate(gate_socket)
                kind, params = NOTICES["aws"]
                for block in range(max(3, trials // BLOCK)):
                    mode = modes[block % 3]
                    load = None
                    cpu0 = proc_cpu_seconds(gate_pid)
                    try:
                        if mode != "idle":
                            port = gate_port if mode == "loaded" else engine_port
                            load = subprocess.Popen([sys.executable, str(here), "--load",
                                                     f"http://127.0.0.1:{port}", "--streams", str(streams)])
                            await anyio.sleep(2.0)  # the streams ramp up
                            if mode == "loaded":
                                with anyio.fail_after(30):  # until they flow through the gate
                                    while int((await call(gate_socket, "stats", timeout=2))["inflight"]) < streams * 0.9:
                                        await anyio.sleep(0.1)
                        for _ in range(BLOCK):
                            await anyio.sleep(random.uniform(0.05, 0.3))  # random phase against the poll cadence
                            raised, raised_wall = time.perf_counter(), time.time()
                            event_id = await emu.raise_notice("aws", kind, **params)
                            seen = await wait_status(http, d.url + "/readyz", 503, timeout=8)
                            seen_wall = time.time() - (time.perf_counter() - seen)
                            latencies[mode].append(seen - raised)
                            polls = [r["timestamp"] for r in await emu.requests(SPOT_PATH)
                                     if r["timestamp"] >= raised_wall and r.get("status") == 200]
                            if polls:
                                reactions[mode].append(seen_wall - min(polls))
                            await back_to_serving(http, d, functools.partial(emu.withdraw, "aws", event_id))
                            # Undrain does not reopen the gate yet (issue 9): reopen it, or the load gets 503s.
                            await call(gate_socket, "draining", timeout=2, on=False)
                    finally:
                        gate_cpu[mode] += proc_cpu_seconds(gate_pid) - cpu0
                        if load is not None:
                            load.kill()
                            load.wait(timeout=10)
        # (the harness stops the gate once the daemon, which would start it again, has gone)
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    idle, loaded, direct = (summary(latencies[mode]) for mode in modes)
    return {"cloud": "aws", "poll_interval": 1.0, "streams": streams, "idle": idle, "loaded": loaded,
            "direct": direct, "p99_ratio": loaded["p99"] / idle["p99"], "p50_ratio": loaded["p50"] / idle["p50"],
            "direct_p99_ratio": direct["p99"] / idle["p99"], "gate_cpu_s": gate_cpu, "latencies": latencies,
            "reaction": {mode: summary(values) for mode, values in reactions.items() if values}}


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
    parser.add_argument("--gate-load", type=int, default=0, metavar="STREAMS",
                        help="also compare AWS detection with the gate idle vs serving STREAMS concurrent streams")
    parser.add_argument("--load", default="", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/detect.json")
    args = parser.parse_args()
    if args.load:
        await load_forever(args.load, args.streams)
        return
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
            if args.gate_load:
                loaded = await gate_load_run(emu, bound.url, args.trials, args.gate_load)
                print(f"aws detection, gate idle / serving {loaded['streams']} streams / same load direct to the "
                      f"engine: p50 {loaded['idle']['p50'] * 1000:.0f} / {loaded['loaded']['p50'] * 1000:.0f} / "
                      f"{loaded['direct']['p50'] * 1000:.0f} ms, p99 {loaded['idle']['p99'] * 1000:.0f} / "
                      f"{loaded['loaded']['p99'] * 1000:.0f} / {loaded['direct']['p99'] * 1000:.0f} ms "
                      f"(p99 ratio to idle {loaded['p99_ratio']:.3f} / {loaded['direct_p99_ratio']:.3f}; "
                      f"n={loaded['idle']['n']} each)", flush=True)
                for mode, reaction in loaded["reaction"].items():
                    print(f"  reaction (poll that carried the notice -> /readyz 503), {mode}: n={reaction['n']} "
                          f"p50={reaction['p50'] * 1000:.1f} ms p99={reaction['p99'] * 1000:.1f} ms", flush=True)
                results["gate_load"] = loaded
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
