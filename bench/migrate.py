"""What clients lose at an eviction, without and with [gate] peers: real llama-servers, the real daemon.

    .venv/bin/python bench/migrate.py [--streams 4] [--window 30] [--json FILE]

Two llama-server replicas (the tiny model) run once for the whole bench: replica A serves the node being
evicted (`spotguard run` with its gate), replica B sits behind a second gate process, the peer. Each variant
starts a fresh daemon for A, puts N long greedy streams in flight through A's gate, then drains it with a
`--window` second deadline (a manual drain, as a 30 s GCP window would), while a client keeps sending new
short requests to A's gate (a load balancer that has not caught up). Variants, in the same run:

- ``baseline``: no peers - the behaviour before peers: what outlasts the wait is cut by the snapshot step
  (a file:// store in both variants), new requests get 503;
- ``peers``: ``[gate] peers`` = the peer gate: new requests are handed over, streams still running after
  the wait are continued there.

Reported per variant: streams completed in full at the client (finish_reason and [DONE], no error event),
the seam gap seen by the client (the longest pause between two content events of a migrated stream: the
local cut, the peer's prefill of prompt + output so far, its first token), and new requests that failed.
The stream length is calibrated so a stream alone would not finish within the wait but can within the
window. KV migration (llama.cpp slot files to the peer) is not built, so there is no third variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import daemon, free_port, percentile  # noqa: E402

from spotguard.config import Config, load  # noqa: E402
from spotguard.control import client as control  # noqa: E402
from spotguard.demo import engines  # noqa: E402
from spotguard.demo.processes import Processes, wait_http  # noqa: E402
from spotguard.demo.traffic import sse_lines
from spotguard.errors import GateError  # noqa: E402
from spotguard.gate.control import call, control_path  # noqa: E402

CHAT = "/v1/chat/completions"


@dataclass
class Stream:
    tokens: int = 0
    finish: str | None = None
    done: bool = False
    error: str = ""
    gaps: list[float] = field(default_factory=list)
    last: float = 0.0

    @property
    def complete(self) -> bool:
        return self.done and self.finish is not None and not self.error


def _body(tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


async def _stream(http: httpx.AsyncClient, url: str, tokens: int, out: Stream, started: anyio.Event) -> None:
    try:
        async with http.stream("POST", url + CHAT, json=_body(tokens, True)) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}"
                return
            async for line in sse_lines(response):
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = str(event["error"].get("type"))
                    continue
                choice = (event.get("choices") or [{}])[0]
                if (choice.get("delta") or {}).get("content"):
                    now = time.monotonic()
                    if out.last:
                        out.gaps.append(now - out.last)
                    out.last = now
                    out.tokens += 1
                    started.set()
                out.finish = choice.get("finish_reason") or out.finish
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__


async def _calibrate(http: httpx.AsyncClient, url: str, streams: int) -> float:
    """Tokens per second of one stream while ``streams`` run at once on replica A (the engine, directly), over
    answers long enough that the slowdown of a growing context shows."""
    counts = [Stream() for _ in range(streams)]
    begin = time.monotonic()
    async with anyio.create_task_group() as tg:
        for out in counts:
            tg.start_soon(_stream, http, url, 2000, out, anyio.Event())
    return min(c.tokens for c in counts) / (time.monotonic() - begin)


async def _new_requests(http: httpx.AsyncClient, url: str, failed: list[str], sent: list[int],
                        stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            response = await http.post(url + CHAT, json=_body(8, False))
            if response.status_code != 200:
                failed.append(str(response.status_code))
        except httpx.HTTPError as exc:
            failed.append(type(exc).__name__)
        sent.append(1)
        with anyio.move_on_after(0.2):
            await stop.wait()


async def _stop_gate(config: Path) -> None:
    try:
        await call(control_path(load(config, environ={})), "stop", timeout=5.0)
    except GateError:
        pass


async def variant(name: str, replica_a: str, peer: str | None, streams: int, tokens: int,
                  window: float, store: Path) -> dict[str, Any]:
    store.mkdir(parents=True, exist_ok=True)
    gate_port = free_port()
    gate_url = f"http://127.0.0.1:{gate_port}"
    sections: dict[str, dict[str, Any]] = {
        "agent": {"cloud": "none"},
        "shutdown": {"trigger": "system-shutdown"},
        "server": {"kind": "llamacpp", "url": replica_a},
        "gate": {"listen": f"127.0.0.1:{gate_port}", "upstream": replica_a, "peers": [peer] if peer else []},
        # A node with snapshots, as in production: the snapshot step ends what is still running after the wait.
        "snapshot": {"url": f"file://{store}"},
    }
    results = [Stream() for _ in range(streams)]
    failed: list[str] = []
    sent: list[int] = []
    with daemon(sections) as d:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http:
                await wait_http(d.url + "/readyz", d.proc, "spotguard run", d.config, timeout=60)
                async with anyio.create_task_group() as tg:
                    started = [anyio.Event() for _ in results]
                    for out, event in zip(results, started, strict=True):
                        tg.start_soon(_stream, http, gate_url, tokens, out, event)
                    with anyio.fail_after(30):
                        for event in started:
                            await event.wait()
                    await control.drain(d.socket, reason=f"bench {name}", deadline_seconds=window)
                    stop = anyio.Event()
                    tg.start_soon(_new_requests, http, gate_url, failed, sent, stop)
                    # New requests until just before the VM would go away; streams until they end or it does.
                    with anyio.move_on_after(window - 1.5):
                        await stop.wait()
                    stop.set()
                    with anyio.move_on_after(3):
                        while any(not (r.done or r.error) for r in results):
                            await anyio.sleep(0.1)
                    tg.cancel_scope.cancel()
                status = (await http.get(d.url + "/status")).json()
        finally:
            await _stop_gate(d.config)
    seams = [max(r.gaps) for r in results if r.gaps]
    steps = {s["name"]: f"{s['outcome']}: {s['detail']}" for s in status.get("steps", [])}
    return {
        "variant": name, "streams": streams, "tokens_per_stream": tokens, "window_s": window,
        "completed": sum(r.complete for r in results),
        "completed_pct": round(100 * sum(r.complete for r in results) / streams, 1),
        "errors": sorted({r.error for r in results if r.error}),
        "seam_gap_p50_ms": round(1000 * percentile(seams, 50), 1) if seams else None,
        "seam_gap_p99_ms": round(1000 * percentile(seams, 99), 1) if seams else None,
        "new_requests_sent": len(sent), "new_requests_failed": len(failed),
        "migrate_step": steps.get("migrate", ""), "wait_inflight_step": steps.get("wait_inflight", ""),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spotguard-bench-migrate-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        procs = Processes(logs=work / "logs")
        try:
            choice = await engines.choose(work, work / "logs", print)
            if choice.binary is None:
                raise SystemExit(f"bench/migrate.py needs the llama-server build: {choice.reason}")
            replica_a = await engines.start_engine(procs, choice, "replica-a", work)
            replica_b = await engines.start_engine(procs, choice, "replica-b", work)
            peer_port = free_port()
            peer_config = work / "peer.toml"
            peer_config.write_text(_peer_config(work, peer_port, replica_b.url))
            peer = procs.start("peer-gate", [sys.executable, "-m", "spotguard", "gate", "--config", str(peer_config)])
            peer_url = f"http://127.0.0.1:{peer_port}"
            await wait_http(peer_url + "/health", peer, "the peer gate", work / "logs" / "peer-gate.log")
            async with httpx.AsyncClient(timeout=60) as http:
                rate = await _calibrate(http, replica_a.url, args.streams)
            # Longer than the local wait (about a third of the window with peers), short enough to end within it.
            tokens = max(200, int(rate * args.window * 0.5))
            print(f"calibrated: {rate:.0f} tokens/s per stream with {args.streams} at once -> {tokens} tokens each")
            rows = []
            for name, peer_of in (("baseline", None), ("peers", peer_url)):
                row = await variant(name, replica_a.url, peer_of, args.streams, tokens, args.window,
                                    work / f"snapshots-{name}")
                print(json.dumps(row))
                rows.append(row)
        finally:
            procs.stop_all()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _peer_config(work: Path, port: int, upstream: str) -> str:
    config = Config().replace("agent", state_dir=str(work / "peer-state"), log_format="json").replace(
        "control", socket=str(work / "peer-control.sock")).replace(
        "gate", listen=f"127.0.0.1:{port}", upstream=upstream).replace("server", kind="llamacpp")
    from spotguard.config import to_toml

    return to_toml(config)


if __name__ == "__main__":
    anyio.run(main)
