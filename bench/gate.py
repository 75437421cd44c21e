"""What the gate costs: added latency, streaming throughput, CPU and RSS, against direct and nginx.

    .venv/bin/python bench/gate.py [--quick] [--rounds 3] [--asyncio] [--baseline REV] [--only plain:50,stream:200]

Processes: a fast fake OpenAI engine, the variants in front of it, and this load generator. Variants:
``gate`` is ``spotguard gate`` exactly as the daemon starts it (on uvloop); ``nginx`` is Debian's
nginx-light as a keep-alive, unbuffered reverse proxy with one worker (tools/setup-bench-tools.sh);
``--asyncio`` adds the gate on the stock asyncio loop (what uvloop is worth), ``--baseline REV`` the
gate of an older revision (what a data-path change is worth). For 1, 50 and 200 concurrent clients,
rounds of direct and of every variant interleave (in a rotating order) so machine noise hits all alike:

- non-streaming: request latency p50/p99 (clients paced to a fixed total request rate, as LLM clients
  are: the gate's cost shows as added latency, not as queueing in a saturated loop);
- streaming: time to first byte p50/p99 and token throughput (the engine paces tokens like a GPU);
- CPU of the variant's processes per 1,000 requests (and per streamed chunk), counted from the moment every
  client's connection is warm to the end of the last request: what serving costs. The round's set-up
  (accepting the clients' connections, one warm-up request each, closing them) is connection churn, not
  chunks: it is reported apart, as ``setup_cpu_ms`` a round;
- the variant's RSS at the end.

Reports the median over rounds of each figure, variant-minus-direct and variant-over-direct. Targets
(issue 11), as p99 added over direct: 50 paced clients non-streaming <= max(1 ms, 2 x nginx's); 200
concurrent streams, time to first byte <= max(2 ms, 2 x nginx's); streaming throughput >= 98% of direct
at every point; zero errors. Bounded: each round has a fixed length and every request a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._harness import free_port, proc_cpu_seconds, proc_rss_mb  # noqa: E402
from spotguard.asgi import Receive, Scope, Send, read_body, serve  # noqa: E402
from spotguard.gate.listen import nodelay_socket  # noqa: E402

CONCURRENCY = (1, 50, 200)
RATE = 150.0
"""Total offered requests/s with many clients (one client alone runs back to back)."""
TOKENS = 30
TOKEN_INTERVAL = 0.02
"""Seconds between tokens from the fake engine: 50 tokens/s per stream, a fast GPU."""
CHAT_BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say something."}],
                        "max_tokens": TOKENS}).encode()
STREAM_BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say something."}],
                          "max_tokens": TOKENS, "stream": True}).encode()


# -- the fake engine: answers from precomputed bytes -------------------------------------------

def _chunk(i: int) -> bytes:
    event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
             "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def engine_app() -> object:
    answer = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "bench",
                         "choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": "".join(f" word{i}" for i in range(TOKENS))},
                                      "finish_reason": "length"}]}).encode()
    answer_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    chunks = [_chunk(i) for i in range(TOKENS)]
    done = b"data: [DONE]\n\n"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, 1 << 20)
        if b'"stream": true' not in body:
            await send({"type": "http.response.start", "status": 200, "headers": answer_headers})
            await send({"type": "http.response.body", "body": answer})
            return
        await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
        next_at = time.perf_counter()
        for chunk in chunks:
            next_at += TOKEN_INTERVAL
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await anyio.sleep(max(0.0, next_at - time.perf_counter()))
        await send({"type": "http.response.body", "body": done})

    return app


def serve_role(role: str, port: int, upstream: str) -> None:
    if role == "engine":
        anyio.run(serve, engine_app(), nodelay_socket("127.0.0.1", port))  # type: ignore[arg-type]
        return
    from spotguard.gate.listen import run_gate
    from spotguard.gate.proxy import Gate
    from spotguard.metrics import Metrics

    async def gate() -> None:
        await run_gate(Gate(upstream=upstream, metrics=Metrics()), f"127.0.0.1:{port}")

    anyio.run(gate)


# -- the load generator ------------------------------------------------------------------------

@dataclass(frozen=True)
class Round:
    p50_ms: float
    p99_ms: float
    tokens_per_s: float = 0.0
    requests: int = 0
    errors: int = 0
    cpu_s: float = 0.0
    """The variant's CPU seconds from every connection warm to the last answer (``cpu`` of ``run_round``)."""


def no_cpu() -> float:
    """``cpu`` for the direct runs: no process in between."""
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


@contextlib.asynccontextmanager
async def warm_clients(url: str, clients: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One client (one connection) per simulated user, as real users are: a single httpx pool of hundreds of
    connections would make the load generator itself the bottleneck. Every connection is warmed (client ->
    variant -> engine) before it is handed out: connecting is not what a round measures."""
    tls = ssl.create_default_context()
    pool = [httpx.AsyncClient(base_url=url, timeout=10, verify=tls,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            for _ in range(clients)]
    try:
        async with anyio.create_task_group() as warm:
            for client in pool:
                warm.start_soon(functools.partial(client.post, "/v1/chat/completions", content=CHAT_BODY))
        yield pool
    finally:
        for client in pool:
            await client.aclose()


async def run_round(url: str, clients: int, seconds: float, stream: bool,
                    cpu: Callable[[], float] = no_cpu) -> Round:
    """``cpu`` reads the variant's CPU seconds so far: read once every connection is warm, and after the last
    request."""
    latencies: list[float] = []
    tokens = 0
    errors = 0
    interval = 0.0 if clients == 1 else clients / RATE
    async with warm_clients(url, clients) as pool:
        cpu_before = cpu()
        start = time.perf_counter()
        stop_at = start + seconds

        async def one_client(client: httpx.AsyncClient) -> None:
            nonlocal tokens, errors
            next_at = time.perf_counter() + random.random() * interval
            while True:
                if interval:
                    await anyio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += interval
                began = time.perf_counter()
                if began >= stop_at:
                    return
                try:
                    if not stream:
                        response = await client.post("/v1/chat/completions", content=CHAT_BODY)
                        latencies.append(time.perf_counter() - began)
                        errors += response.status_code != 200
                        continue
                    first = True
                    async with client.stream("POST", "/v1/chat/completions", content=STREAM_BODY) as response:
                        async for chunk in response.aiter_raw():
                            if first:
                                latencies.append(time.perf_counter() - began)
                                first = False
                            tokens += chunk.count(b"delta")
                except httpx.HTTPError:
                    errors += 1

        with anyio.fail_after(seconds + 15):
            async with anyio.create_task_group() as tg:
                for client in pool:
                    tg.start_soon(one_client, client)
        elapsed = time.perf_counter() - start
        cpu_used = cpu() - cpu_before
    return Round(p50_ms=pct(latencies, 0.5), p99_ms=pct(latencies, 0.99), tokens_per_s=tokens / elapsed,
                 requests=len(latencies), errors=errors, cpu_s=cpu_used)


BURSTS = 4
"""Bursts per round in ``burst`` mode; each: every client starts one stream at the same instant."""


async def run_burst(url: str, clients: int, bursts: int, cpu: Callable[[], float] = no_cpu) -> Round:
    """``clients`` streams starting together (a load balancer handing a node its share at once), ``bursts``
    times: time to first byte of each, and the tokens relayed (for the CPU a streamed chunk costs)."""
    latencies: list[float] = []
    tokens = 0
    errors = 0
    async with warm_clients(url, clients) as pool:
        cpu_before = cpu()
        start = time.perf_counter()
        for _ in range(bursts):
            go = anyio.Event()

            async def one(client: httpx.AsyncClient, go: anyio.Event = go) -> None:
                nonlocal tokens, errors
                await go.wait()
                began = time.perf_counter()
                first = True
                try:
                    async with client.stream("POST", "/v1/chat/completions", content=STREAM_BODY) as response:
                        async for chunk in response.aiter_raw():
                            if first:
                                latencies.append(time.perf_counter() - began)
                                first = False
                            tokens += chunk.count(b"delta")
                except httpx.HTTPError:
                    errors += 1

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for client in pool:
                        tg.start_soon(one, client)
                    await anyio.sleep(0.2)  # every client waiting on the event: then all at once
                    go.set()
            await anyio.sleep(0.3)
        elapsed = time.perf_counter() - start
        cpu_used = cpu() - cpu_before
    return Round(p50_ms=pct(latencies, 0.5), p99_ms=pct(latencies, 0.99), tokens_per_s=tokens / elapsed,
                 requests=len(latencies), errors=errors, cpu_s=cpu_used)


def median(rounds: list[Round], name: str) -> float:
    return float(statistics.median(getattr(r, name) for r in rounds))


async def measure(direct: str, gates: dict[str, str], pids: dict[str, list[int]], rounds: int, seconds: float,
                  only: set[tuple[str, ...]]) -> list[dict[str, object]]:
    """One row per (mode, clients, variant); every variant's rounds interleave with the direct ones."""
    rows: list[dict[str, object]] = []
    points = [(mode, clients) for mode in ("plain", "stream") for clients in CONCURRENCY] + [("burst", 200)]
    for mode, clients in points:
        if only and (mode, str(clients)) not in only:
            continue
        stream = mode != "plain"
        results: dict[str, list[Round]] = {"direct": [], **{name: [] for name in gates}}
        cpu = {name: 0.0 for name in gates}
        for i in range(rounds):
            order = [("direct", direct), *gates.items()]
            # rotate, so that no variant always runs right after another one
            order = order[i % len(order):] + order[:i % len(order)]
            for name, url in order:
                reader = functools.partial(cpu_seconds, pids[name]) if name in pids else no_cpu
                before = reader()
                if mode == "burst":
                    results[name].append(await run_burst(url, clients, BURSTS, reader))
                else:
                    results[name].append(await run_round(url, clients, seconds, stream, reader))
                if name in pids:
                    cpu[name] += reader() - before
        d = results["direct"]
        for variant in gates:
            g = results[variant]
            served = sum(r.requests for r in g)
            serving = sum(r.cpu_s for r in g)
            row: dict[str, object] = {
                "mode": mode, "clients": clients, "variant": variant,
                "direct_p50_ms": median(d, "p50_ms"), "gate_p50_ms": median(g, "p50_ms"),
                "direct_p99_ms": median(d, "p99_ms"), "gate_p99_ms": median(g, "p99_ms"),
                "added_p50_ms": median(g, "p50_ms") - median(d, "p50_ms"),
                "added_p99_ms": median(g, "p99_ms") - median(d, "p99_ms"),
                "requests": sum(r.requests for r in d + g), "errors": sum(r.errors for r in g),
                "direct_errors": sum(r.errors for r in d),
                "cpu_ms_per_1000": round(1e6 * serving / max(1, served), 1),
                "setup_cpu_ms": round(1e3 * (cpu[variant] - serving) / rounds, 1),
                "rounds": {k: [asdict(r) for r in results[k]] for k in ("direct", variant)},
            }
            if stream:
                row["throughput_ratio"] = median(g, "tokens_per_s") / max(median(d, "tokens_per_s"), 1e-9)
                row["direct_tokens_per_s"] = median(d, "tokens_per_s")
                row["gate_tokens_per_s"] = median(g, "tokens_per_s")
                # What one streamed chunk costs the proxy: its CPU over the chunks it relayed (TOKENS a stream,
                # plus the head and [DONE], which every variant pays alike).
                row["cpu_us_per_chunk"] = round(1e6 * serving / max(1, served * TOKENS), 2)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict[str, object]) -> str:
    text = (f"{row['mode']:>6} c={row['clients']:<3} {row['variant']:<16} "
            f"p50 direct {row['direct_p50_ms']:7.2f} gate {row['gate_p50_ms']:7.2f} added {row['added_p50_ms']:+6.2f} ms | "
            f"p99 direct {row['direct_p99_ms']:7.2f} gate {row['gate_p99_ms']:7.2f} added {row['added_p99_ms']:+6.2f} ms")
    if "throughput_ratio" in row:
        text += (f" | tok/s direct {row['direct_tokens_per_s']:7.0f} gate {row['gate_tokens_per_s']:7.0f} "
                 f"ratio {row['throughput_ratio']:.3f} | {row['cpu_us_per_chunk']} us/chunk")
    return text + (f" | cpu {row['cpu_ms_per_1000']} ms/1000 req (+ {row['setup_cpu_ms']} ms a round's set-up)"
                   f" | n={row['requests']} err={row['errors']}")


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.post(url + "/v1/chat/completions", content=CHAT_BODY, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)  # bounded by the deadline: process start-up
    raise SystemExit(f"{url} did not come up")


# -- the variants: each a process (or two, for nginx) in front of the same engine -------------------

NGINX_CONF = """
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    upstream engine {{ server 127.0.0.1:{engine_port}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_command(tmp: Path, engine_port: int, port: int) -> list[str]:
    """nginx as a plain keep-alive, unbuffered reverse proxy, one worker (the gate is one process)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("nginx is not installed: run `make tools` (tools/setup-bench-tools.sh installs nginx-light)")
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user="user root;\n" if os.geteuid() == 0 else "", tmp=tmp,
                                      engine_port=engine_port, port=port))
    return [binary, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"]


def gate_command(tmp: Path, name: str, engine_url: str, port: int, uvloop: bool, *extra: str) -> list[str]:
    """``spotguard gate`` exactly as the daemon starts it (control socket and all)."""
    conf = tmp / f"{name}.toml"
    conf.write_text(f'''[agent]
log_format = "json"
log_level = "warning"
state_dir = "{tmp}/{name}"
[control]
socket = "{tmp}/{name}-control.sock"
[gate]
listen = "127.0.0.1:{port}"
upstream = "{engine_url}"
control_socket = "{tmp}/{name}.sock"
''')
    return [sys.executable, "-m", "spotguard", "gate", "--config", str(conf), "--uvloop" if uvloop else "--no-uvloop",
            *extra]


def baseline_tree(tmp: Path, rev: str) -> Path:
    """The spotguard package as of ``rev`` (git archive), to run an older gate beside this one."""
    tree = tmp / f"baseline-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "spotguard", "bench"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (nginx's worker)."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    return pids + [int(c) for c in children]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except OSError:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description="gate vs nginx vs direct: latency, throughput, CPU and RSS")
    parser.add_argument("--serve", choices=("engine", "gate"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="one short round per point (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point and variant (median reported)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--asyncio", action="store_true",
                        help="also run the gate on the stock asyncio loop (what uvloop is worth)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="also run `spotguard gate ARGS` as variant NAME (e.g. nogc=--no-gc-freeze)")
    parser.add_argument("--baseline", default="",
                        help="also run the gate of this git revision (e.g. an older data path), side by side")
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="length of a paced round (the load after every connection is warm)")
    parser.add_argument("--only", default="", help="comma-separated points to run, e.g. plain:50,stream:200")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gate.json")
    args = parser.parse_args()
    if args.serve:
        serve_role(args.serve, args.port, args.upstream)
        return
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    pythonpath = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, pythonpath))}
    me = [sys.executable, str(Path(__file__).resolve())]
    procs: list[subprocess.Popen[bytes]] = []
    gates: dict[str, str] = {}
    pids: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="spotguard-gate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            procs.append(subprocess.Popen([*me, "--serve", "engine", "--port", str(engine_port)], env=env))
            _wait_up(engine_url, procs[0])
            commands: dict[str, tuple[list[str], dict[str, str]]] = {}
            ports = {name: free_port() for name in ("gate", "gate-asyncio", "baseline", "nginx")}
            for spec in args.variant:
                name, _, extra = spec.partition("=")
                ports[f"gate-{name}"] = free_port()
                commands[f"gate-{name}"] = (gate_command(tmp, f"gate-{name}", engine_url, ports[f"gate-{name}"], True,
                                                         *extra.split()), env)
            commands["gate"] = (gate_command(tmp, "gate", engine_url, ports["gate"], True), env)
            if args.asyncio:
                commands["gate-asyncio"] = (gate_command(tmp, "gate-asyncio", engine_url, ports["gate-asyncio"],
                                                         False), env)
            if args.baseline:
                tree = baseline_tree(tmp, args.baseline)
                if (tree / "spotguard" / "__main__.py").exists():  # that revision's own `spotguard gate`
                    command = gate_command(tmp, "baseline", engine_url, ports["baseline"], True)
                    # ahead of the working directory and of this checkout's editable install
                    command[1:3] = ["-c", f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv[0] = 'spotguard'; "
                                          "from spotguard.cli import main; main()"]
                else:  # before the gate was a process: its Gate served in-process, as that bench did
                    command = [sys.executable, str(tree / "bench" / "gate.py"), "--serve", "gate", "--port",
                               str(ports["baseline"]), "--upstream", engine_url]
                commands[f"gate@{args.baseline}"] = (command, {**os.environ, "PYTHONPATH": str(tree)})
                ports[f"gate@{args.baseline}"] = ports["baseline"]
            if not args.no_nginx:
                commands["nginx"] = (nginx_command(tmp, engine_port, ports["nginx"]), env)
            for name, (command, variant_env) in commands.items():
                gates[name] = f"http://127.0.0.1:{ports[name]}"
                procs.append(subprocess.Popen(command, env=variant_env))
                _wait_up(gates[name], procs[-1])
                pids[name] = process_tree(procs[-1].pid)
            rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
            only = {tuple(p.split(":")) for p in args.only.split(",") if p}
            print(f"gate bench: rounds={rounds} x {seconds}s, rate={RATE:.0f} req/s with many clients, "
                  f"{TOKENS} tokens every {TOKEN_INTERVAL * 1000:.0f} ms when streaming; cpus={os.cpu_count()}; "
                  f"variants={', '.join(gates)}", flush=True)
            rows = anyio.run(measure, engine_url, gates, pids, rounds, seconds, only)
            rss = {name: sum(proc_rss_mb(pid) for pid in pids[name]) for name in gates}
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    summary: dict[str, object] = {"rss_mb": rss}
    nginx = {(r["mode"], r["clients"]): r for r in rows if r["variant"] == "nginx"}
    for variant in gates:
        mine = [r for r in rows if r["variant"] == variant]
        ratios = [float(r["throughput_ratio"]) for r in mine if r["mode"] == "stream"]  # type: ignore[arg-type]
        entry: dict[str, object] = {
            "errors": sum(int(r["errors"]) for r in mine),  # type: ignore[call-overload]
            "min_stream_throughput_ratio": min(ratios) if ratios else None,
            "cpu_ms_per_1000": {f"{r['mode']}:{r['clients']}": r["cpu_ms_per_1000"] for r in mine},
        }
        for (mode, clients, floor) in (("plain", 50, 1.0), ("stream", 200, 2.0), ("burst", 200, 2.0)):
            row = next((r for r in mine if (r["mode"], r["clients"]) == (mode, clients)), None)
            if row is None:
                continue
            reference = nginx.get((mode, clients))
            limit = max(floor, 2 * float(reference["added_p99_ms"])) if reference else floor  # type: ignore[arg-type]
            entry[f"p99_added_ms_{mode}_{clients}"] = row["added_p99_ms"]
            entry[f"target_ms_{mode}_{clients}"] = limit
            entry[f"met_{mode}_{clients}"] = float(row["added_p99_ms"]) <= limit  # type: ignore[arg-type]
            if "cpu_us_per_chunk" in row and reference is not None:
                # CPU per streamed chunk within 1.5 x nginx's (issue 18)
                ratio = float(row["cpu_us_per_chunk"]) / max(float(reference["cpu_us_per_chunk"]), 1e-9)  # type: ignore[arg-type]
                entry[f"cpu_per_chunk_vs_nginx_{mode}_{clients}"] = round(ratio, 2)
                entry[f"cpu_met_{mode}_{clients}"] = ratio <= 1.5
        summary[variant] = entry
    print(json.dumps(summary, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
