"""How fast the engine hears "stop" after a notice, and how much time each drain leaves.

    .venv/bin/python bench/drain.py [--trials 100] [--stuck-trials 30]

``spotguard run`` (a real process, default drain settings) watches the in-process emulator and drives a
stand-in vLLM (``bench/_engine.py``, its own process) that records the wall-clock instant SIGTERM
arrives. Per trial: a notice is raised, the daemon drains, and from its ``/status`` we take the notice's
``detected_at`` and ``deadline`` and each step's ``finished_at``.

- stop after detection = SIGTERM received by the engine - the notice's detected_at;
- readiness after detection = the readiness step's finished_at - detected_at: the in-process floor
  (a flag flip) that the stop, which crosses a process boundary, is compared with in the same trials;
- slack = (deadline - safety margin) - the end of the drain's last step; must stay >= 1 s.

Two scenarios per cloud: ``healthy`` (the engine's running requests finish 0.2-2 s after the signal,
default deadlines: AWS 120 s, Azure Preempt 30 s, GCP window 30 s) and ``stuck`` (they never finish, so
the drain's own budgets must end it; deadlines shortened to 10 s to keep the run short).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import back_to_serving, daemon, free_port, summary, wait_status  # noqa: E402
from spotguard.config import load  # noqa: E402
from spotguard.emulator import EmulatorApp, EmulatorControl, run_emulator  # noqa: E402

STUCK_DEADLINE = 10.0
ENGINE = Path(__file__).with_name("_engine.py")


def notice_params(cloud: str, deadline: float | None) -> tuple[str, dict[str, Any]]:
    if cloud == "aws":
        return "spot", {"action": "terminate", "in_seconds": deadline or 120}
    if cloud == "azure":
        return "event", {"event_type": "Preempt", "not_before_in_seconds": deadline or 30}
    return "preempted", {}  # GCP's deadline is the daemon's [gcp] window


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def until_drained(http: httpx.AsyncClient, url: str, timeout: float) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            doc = (await http.get(url + "/status")).json()
            if doc["state"] == "drained":
                return dict(doc)
            await anyio.sleep(0.01)


async def scenario(emu: EmulatorControl, emu_url: str, cloud: str, name: str, trials: int) -> dict[str, Any]:
    deadline = STUCK_DEADLINE if name == "stuck" else None
    with tempfile.TemporaryDirectory(prefix="spotguard-bench-engine-") as tmp:
        port, stops = free_port(), Path(tmp) / "stops.txt"
        engine = subprocess.Popen([sys.executable, str(ENGINE), str(port), str(stops)], stdout=subprocess.PIPE)
        try:
            assert engine.stdout is not None and engine.stdout.readline().strip() == b"ready"
            engine_url = f"http://127.0.0.1:{port}"
            sections: dict[str, dict[str, Any]] = {
                "agent": {"cloud": cloud},
                cloud: {"metadata_url": emu_url},
                "server": {"kind": "vllm", "pid": engine.pid, "url": engine_url},
            }
            if cloud == "azure":
                sections["azure"]["vm_name"] = "spotguard-vm"
            if cloud == "gcp" and deadline:
                sections["gcp"]["window"] = deadline
            with daemon(sections) as d:
                margin = load(d.config, environ={}).drain.safety_margin
                return await _trials(emu, d, cloud, name, trials, deadline, margin, engine_url, stops)
        finally:
            engine.kill()
            engine.wait(timeout=10)


async def _trials(emu: EmulatorControl, d: Any, cloud: str, name: str, trials: int, deadline: float | None,
                  margin: float, engine_url: str, stops: Path) -> dict[str, Any]:
    stop_ms: list[float] = []
    ready_ms: list[float] = []
    slack: list[float] = []
    drain_s: list[float] = []
    kind, params = notice_params(cloud, deadline)
    async with httpx.AsyncClient(timeout=5.0) as http:
        await wait_status(http, d.url + "/readyz", 200, timeout=30)
        for _ in range(trials):
            finish_after = math.inf if name == "stuck" else random.uniform(0.2, 2.0)
            await http.post(f"{engine_url}/mode", params={"finish_after": str(finish_after)})
            await anyio.sleep(random.uniform(0.05, 0.3))  # random phase against the poll cadence
            event_id = await emu.raise_notice(cloud, kind, **params)
            doc = await until_drained(http, d.url, timeout=(deadline or 120) + 10)
            detected = epoch(doc["notice"]["detected_at"])
            ends = [epoch(s["finished_at"]) for s in doc["steps"] if s.get("finished_at")]
            readiness = next(s for s in doc["steps"] if s["name"] == "readiness")
            stopped = float(stops.read_text().split()[-1])
            stop_ms.append((stopped - detected) * 1000)
            ready_ms.append((epoch(readiness["finished_at"]) - detected) * 1000)
            slack.append(epoch(doc["drain_deadline"]) - max(ends))  # the daemon's drain deadline: margin taken off
            drain_s.append(max(ends) - detected)
            await back_to_serving(http, d, functools.partial(emu.withdraw, cloud, event_id))
    return {"cloud": cloud, "scenario": name, "deadline_s": deadline, "safety_margin_s": margin,
            "stop_after_detection_ms": summary(stop_ms), "readiness_after_detection_ms": summary(ready_ms),
            "drain_seconds": summary(drain_s), "slack_before_margin_s": summary(slack),
            "trials_with_slack_under_1s": sum(1 for s in slack if s < 1.0)}


def line(run: dict[str, Any]) -> str:
    stop, ready, slack = run["stop_after_detection_ms"], run["readiness_after_detection_ms"], run["slack_before_margin_s"]
    return (f"{run['cloud']:5s} {run['scenario']:7s} n={stop['n']:3d}  stop p50 {stop['p50']:6.1f} ms p99 "
            f"{stop['p99']:6.1f} ms | readiness p50 {ready['p50']:5.1f} ms p99 {ready['p99']:5.1f} ms | "
            f"drain p50 {run['drain_seconds']['p50']:5.2f} s | slack min {slack['min']:6.2f} s p50 {slack['p50']:6.2f} s"
            f" | trials with slack < 1 s: {run['trials_with_slack_under_1s']}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100, help="healthy-engine trials per cloud")
    parser.add_argument("--stuck-trials", type=int, default=30, help="stuck-engine trials per cloud")
    parser.add_argument("--clouds", default="aws,gcp,azure")
    parser.add_argument("--out", default="bench/results/drain.json")
    args = parser.parse_args()
    runs = []
    async with anyio.create_task_group() as tg:
        bound = await tg.start(run_emulator, "127.0.0.1", 0, EmulatorApp())
        async with EmulatorControl(bound.url) as emu:
            for cloud in args.clouds.split(","):
                for name, trials in (("healthy", args.trials), ("stuck", args.stuck_trials)):
                    if trials > 0:
                        runs.append(await scenario(emu, bound.url, cloud, name, trials))
                        print(line(runs[-1]), flush=True)
        tg.cancel_scope.cancel()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs},
                                         indent=2))


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
