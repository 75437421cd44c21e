"""The demo's story: a serving node with requests in flight gets a spot notice, and spotguard drains it.

Every part is real and local: the metadata emulator, llama-server replicas (or the stand-in), the gate, the
daemon (``spotguard run``), moto's ELBv2, a file:// store, a webhook receiver, an HTTP client.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from spotguard.asgi import serve_tcp
from spotguard.client import resumable_async_http_client
from spotguard.demo import engines
from spotguard.demo.balancer import MOTO_ENV, TargetGroup, start_target_group
from spotguard.demo.hooks import Receiver
from spotguard.demo.node import Node, fleet_key, write_node, write_peer_gate
from spotguard.demo.processes import Processes, free_port, wait_http
from spotguard.demo.traffic import Answer, Ask, send
from spotguard.emulator import EmulatorControl, run_emulator
from spotguard.errors import GateError
from spotguard.gate.control import call


@dataclass(frozen=True)
class Plan:
    """How long things take: the notice's window, the in-flight wait, and the requests' lengths."""

    window: float
    """Seconds from the notice to the (emulated) power-off."""
    wait_budget: float
    """[drain] wait_inflight_budget: the long request outlasts it, so the snapshot has work."""
    short: float
    """Seconds a short request runs alone."""
    long: float
    """Seconds the long request runs alone: well past the window, since replica 2 takes it over at the notice
    and runs it alone, faster than the calibration measured it on a busy machine."""
    asks: tuple[tuple[str, bool, str], ...]
    """(name, stream?, "short" | "long")."""


FULL = Plan(window=20, wait_budget=8, short=2.0, long=36.0, asks=(
    ("chat-1", False, "short"), ("stream-1", True, "short"), ("chat-2", False, "short"),
    ("stream-2", True, "short"), ("stream-long", True, "long")))
SHORT = Plan(window=10, wait_budget=3, short=0.6, long=20.0, asks=(
    ("chat-1", False, "short"), ("stream-1", True, "short"), ("stream-long", True, "long")))
"""The long request outlasts the window: replica 2 finishes it after this node is gone, and the client gets
it whole all the same."""


@dataclass
class Run:
    """What the story produced, for the report (and the test)."""

    workdir: Path
    procs: Processes | None = None
    engine_note: str = ""
    answers: list[Answer] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_text: str = ""
    svg: Path | None = None
    node: Node | None = None
    group: TargetGroup | None = None
    no_group: str = ""
    registered_after: list[str] | None = None
    webhooks: list[str] = field(default_factory=list)
    after_notice: str = ""
    resumed: str = ""
    notice_at: float = 0.0
    """time.monotonic() when the notice was raised."""
    vm_gone_at: float = 0.0
    """time.monotonic() of the notice's deadline: replica 1 powers off."""


def tokens_for(seconds: float, per_token: float) -> int:
    """Tokens that take about ``seconds`` on the tiny model: each costs ``per_token`` plus attention over
    what came before (measured: T(n) ~ c*n*(1 + n/1200))."""
    scaled = seconds / per_token
    n = 600 * (math.sqrt(1 + scaled / 300) - 1)
    return max(16, min(15000, int(n)))


async def _calibrate(http: httpx.AsyncClient, gate: str, engine: engines.Engine) -> float:
    """Seconds per token of one request alone (the stand-in's are fixed)."""
    if engine.kind != "llama-server":
        from spotguard.demo.standin import TOKEN_DELAY

        return TOKEN_DELAY
    began = time.monotonic()
    answer = Answer(Ask("warm-up", False, 300))
    await send(http, gate, answer)
    if not answer.completed:
        raise RuntimeError(f"a first request through the gate failed: {answer.outcome()}")
    return (time.monotonic() - began) / 300 / (1 + 300 / 1200)


async def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    try:
        with anyio.fail_after(timeout):
            while not (result := await check()):
                await anyio.sleep(0.05)
            return result
    except TimeoutError:
        raise RuntimeError(f"{what}: not within {timeout:.0f}s") from None


async def story(procs: Processes, run: Run, plan: Plan, say: Callable[[str], None], *, want_llama: bool,
                build: bool) -> None:
    workdir = run.workdir
    choice = await engines.choose(workdir, procs.logs, say, build=build, want_llama=want_llama)
    if choice.binary is None:
        run.engine_note = f"stand-in engine: {choice.why_not}"
        say(f"llama-server unavailable: {choice.why_not}. The demo runs the stand-in engine instead.")
    receiver = Receiver()
    async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
        emulator = await tg.start(run_emulator, "127.0.0.1", 0)
        hook = await tg.start(serve_tcp, receiver, "127.0.0.1", 0)
        say(f"1. metadata emulator (AWS, GCP, Azure) on {emulator.url}; webhook receiver on {hook.url}/hook")
        engine = await engines.start_engine(procs, choice, "replica-1", workdir)
        peer = await engines.start_engine(procs, choice, "replica-2", workdir)
        key = fleet_key(workdir)
        peer_port = free_port()
        peer_gate = f"http://127.0.0.1:{peer_port}"
        peer_config = write_peer_gate(workdir, gate_port=peer_port, engine=peer, key=key)
        gate2 = procs.start("replica-2-gate", [sys.executable, "-m", "spotguard", "gate", "--config",
                                               str(peer_config)], env={**_clean_env(), "PYTHONUNBUFFERED": "1"})
        await wait_http(peer_gate + "/health", gate2, "replica 2's gate", procs.logs / "replica-2-gate.log")
        say(f"2. {engine.kind} replica 1 on {engine.url} (serves this node), replica 2 on {peer.url} behind its "
            f"own gate on {peer_gate} (the peer); both gates share a resume key")
        gate_port, http_port = free_port(), free_port()
        group = await start_target_group(procs, gate_port)
        if isinstance(group, str):
            run.no_group = group
            say(f"3. no load balancer: {group}")
        else:
            run.group = group
            say(f"3. moto ELBv2 on {group.moto_url}: target group llm-demo holds {group.instance_id} "
                f"on the gate's port {gate_port}")
        node = write_node(workdir, emulator=emulator.url, http_port=http_port, gate_port=gate_port, engine=engine,
                          peer_gate=peer_gate, group=run.group, webhook=f"{hook.url}/hook",
                          wait_budget=plan.wait_budget, key=key)
        run.node = node
        daemon = procs.start("daemon", [sys.executable, "-m", "spotguard", "run", "--config", str(node.config)],
                             env={**_clean_env(), **MOTO_ENV, "PYTHONUNBUFFERED": "1"})
        began = time.monotonic()
        await wait_http(node.url + "/readyz", daemon, "spotguard run", procs.logs / "daemon.log", timeout=60)
        gate_pid = int((await call(str(node.gate_socket), "hello", timeout=5))["pid"])
        procs.adopt("gate", gate_pid)
        say(f"4. spotguard run (pid {daemon.pid}) ready in {time.monotonic() - began:.1f}s: /readyz 200 on "
            f"{node.url}; its gate (pid {gate_pid}) on {node.gate} in front of replica 1")
        per_token = await _calibrate(http, node.gate, engine)
        together = len(plan.asks)  # one engine thread shares its time between the requests running together
        answers = [Answer(Ask(name, stream, tokens_for(plan.long if size == "long" else plan.short / together,
                                                       per_token)))
                   for name, stream, size in plan.asks]
        run.answers = answers
        async with anyio.create_task_group() as clients, resumable_async_http_client(timeout=120.0) as resuming:
            for answer in answers:
                clients.start_soon(send, resuming, node.gate, answer)
            with anyio.fail_after(60):
                for answer in answers:
                    await answer.first_token.wait()
            streams = sum(a.ask.stream for a in answers)
            say(f"5. {len(answers)} requests in flight through the gate ({streams} streaming, "
                f"{len(answers) - streams} not), {min(a.ask.max_tokens for a in answers)}-"
                f"{max(a.ask.max_tokens for a in answers)} tokens each; the clients use spotguard.client")
            await _evict(http, run, node, plan, emulator.url, say)
            await _until_answered(run, plan, procs, say)
            clients.cancel_scope.cancel()
        run.webhooks = receiver.texts()
        if any(not a.completed for a in answers):
            run.resumed = await _resume(node, peer, workdir)
            say(f"11. the snapshot resumed on replica 2 with `spotguard resume`: {run.resumed}")
        run.svg = workdir / "timeline.svg"
        run.status_text = await _status(node.config, run.svg)
        await anyio.to_thread.run_sync(procs.stop, "daemon")
        await _adopt_gate(procs, node)  # the one answering now, should the daemon have restarted it
        tg.cancel_scope.cancel()


async def _until_answered(run: Run, plan: Plan, procs: Processes, say: Callable[[str], None]) -> None:
    """Until every client has its answer: replica 1 powers off at the notice's deadline, and what it could not
    finish is finished by replica 2 (bounded: the long answer's own length and half a minute more)."""
    answers = run.answers
    run.vm_gone_at = run.notice_at + plan.window
    give_up = run.vm_gone_at + plan.long + 30
    while not all(a.ended for a in answers) and time.monotonic() < give_up:
        if procs.running("replica-1") and time.monotonic() >= run.vm_gone_at:
            say("9. the notice's deadline: the VM powers off (replica 1 stops); its gate ended the answers it "
                "relayed with a resumable error, and their clients resume them")
            procs.stop("replica-1")
        await anyio.sleep(0.05)
    late = sum(a.finished_after(run.vm_gone_at) for a in answers)
    if all(a.ended for a in answers):
        say(f"10. every client has its answer {time.monotonic() - run.notice_at:.1f}s after the notice"
            + (f"; {late} of them finished by replica 2 after this node's deadline" if late else ""))


async def _adopt_gate(procs: Processes, node: Node) -> None:
    try:
        pid = int((await call(str(node.gate_socket), "hello", timeout=2))["pid"])
    except GateError:
        return
    if pid not in [p for _, p in procs.foreign]:
        procs.adopt("gate", pid)


async def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """``spotguard ARGS`` as an operator runs it; cancellable (the process is killed then)."""
    with anyio.fail_after(timeout):
        return await anyio.run_process([sys.executable, "-m", "spotguard", *args], check=False)


async def _resume(node: Node, peer: engines.Engine, workdir: Path) -> str:
    """Continue what the snapshot saved on the second replica (its KV slot too, with llama-server)."""
    found = sorted(node.store.rglob("manifest.json"))
    if not found:
        return "no snapshot to resume"
    out = workdir / "resumed.jsonl"
    args = ["resume", "file://" + str(found[0].parent), "--config", str(node.config), "--to", peer.url,
            "--max-tokens", "32", "--jsonl", str(out)]
    if peer.kind == "llama-server":
        args += ["--engine", "llamacpp", "--slot-dir", str(peer.slots)]
    done = await _cli(*args)
    if done.returncode != 0 or not out.is_file():
        return f"failed ({done.returncode}): {(done.stderr or done.stdout).decode(errors='replace').strip()[-200:]}"
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    ok = [r for r in records if r.get("ok")]
    kv = sum(bool(r.get("kv_restored")) for r in ok)
    return (f"{len(ok)} of {len(records)} saved request(s) continued" + (f", {kv} from its KV slot" if kv else "")
            + f" ({out})")


async def _status(config: Path, svg: Path) -> str:
    """``spotguard status --svg``: the timeline as an operator sees it."""
    done = await _cli("status", "--config", str(config), "--svg", str(svg), timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"spotguard status failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def _clean_env() -> dict[str, str]:
    # No real cloud credentials or config reach the daemon: moto's are added by the caller.
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPOTGUARD_"))}


async def _evict(http: httpx.AsyncClient, run: Run, node: Node, plan: Plan, emulator: str,
                 say: Callable[[str], None]) -> None:
    async with EmulatorControl(emulator) as control:
        await control.raise_notice("aws", "spot", action="terminate", in_seconds=plan.window)
    raised = run.notice_at = time.monotonic()
    say(f"6. AWS spot interruption notice raised on the emulator: terminate in {plan.window:.0f}s")

    async def not_ready() -> bool:
        return (await http.get(node.url + "/readyz")).status_code == 503

    await _until(not_ready, 15, "/readyz 503 after the notice")
    say(f"   /readyz answers 503 {1000 * (time.monotonic() - raised):.0f} ms after the notice")
    async def gate_closed() -> bool:
        doc = (await http.get(node.url + "/status")).json()
        return any(s.get("name") == "stop_accepting" and s.get("outcome") for s in doc.get("steps") or [])

    await _until(gate_closed, 15, "the stop_accepting step")
    late = await http.post(node.gate + "/v1/chat/completions",
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    run.after_notice = f"{late.status_code}" + (f" (Retry-After {late.headers['retry-after']})"
                                                 if "retry-after" in late.headers else "")
    say(f"   the engine is told to stop; a new request sent to the gate now gets {run.after_notice}")

    async def drained() -> dict[str, Any] | None:
        doc: dict[str, Any] = (await http.get(node.url + "/status")).json()
        return doc if doc.get("state") == "drained" else None

    doc = await _until(drained, plan.window, "the drain")
    run.status.update(doc)
    say(f"7. drained {time.monotonic() - raised:.1f}s after the notice")
    if run.group is not None:
        run.registered_after = await anyio.to_thread.run_sync(run.group.registered)
        say(f"8. target group llm-demo now holds: {run.registered_after or 'nobody'} (asked moto)")
