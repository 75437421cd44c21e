"""What the gate costs: added latency and streaming throughput, gate vs direct, side by side.

    .venv/bin/python bench/gate.py [--quick] [--rounds 3] [--extra-site DIR] [--json bench/results/gate.json]

Three processes: a fast fake OpenAI engine, the gate in front of it, and this load generator. For
1, 50 and 200 concurrent clients it measures, alternating direct and gated rounds so machine noise
hits both alike:

- non-streaming: request latency p50/p99 (clients paced to a fixed total request rate, as LLM clients
  are: the gate's cost shows as added latency, not as queueing in a saturated loop);
- streaming: time to first token p50/p99 and token throughput (the engine paces tokens like a GPU).

Reports the median over rounds of each figure and gate-minus-direct / gate-over-direct. Targets:
p99 added <= 1 ms non-streaming at 50 clients; streaming throughput >= 95% of direct. Bounded: each
round has a fixed length and every request a timeout; the whole run takes well under two minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._harness import free_port  # noqa: E402
from spotguard.asgi import Receive, Scope, Send, read_body, serve  # noqa: E402
from spotguard.gate.proxy import nodelay_socket  # noqa: E402

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
    from spotguard.gate.journal import Journal
    from spotguard.gate.proxy import Gate, run_gate
    from spotguard.metrics import Metrics

    async def gate() -> None:
        await run_gate(Gate(upstream=upstream, journal=Journal(), metrics=Metrics()), f"127.0.0.1:{port}")

    anyio.run(gate)


# -- the load generator ------------------------------------------------------------------------

@dataclass(frozen=True)
class Round:
    p50_ms: float
    p99_ms: float
    tokens_per_s: float = 0.0
    requests: int = 0
    errors: int = 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def run_round(url: str, clients: int, seconds: float, stream: bool) -> Round:
    latencies: list[float] = []
    tokens = 0
    errors = 0
    interval = 0.0 if clients == 1 else clients / RATE
    tls = ssl.create_default_context()
    # One client (one connection) per simulated user, as real users are: a single httpx pool of
    # hundreds of connections would make the load generator itself the bottleneck.
    pool = [httpx.AsyncClient(base_url=url, timeout=10, verify=tls,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            for _ in range(clients)]
    try:
        # Warm every connection (client -> gate -> engine): connecting is not what we measure.
        async with anyio.create_task_group() as warm:
            for client in pool:
                warm.start_soon(functools.partial(client.post, "/v1/chat/completions", content=CHAT_BODY))
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
    finally:
        for client in pool:
            await client.aclose()
    return Round(p50_ms=pct(latencies, 0.5), p99_ms=pct(latencies, 0.99), tokens_per_s=tokens / elapsed,
                 requests=len(latencies), errors=errors)


def median(rounds: list[Round], name: str) -> float:
    return float(statistics.median(getattr(r, name) for r in rounds))


async def measure(direct: str, gates: dict[str, str], rounds: int, seconds: float) -> list[dict[str, object]]:
    """One row per (mode, clients, gate variant); every variant's rounds interleave with the direct ones."""
    rows: list[dict[str, object]] = []
    for stream in (False, True):
        for clients in CONCURRENCY:
            results: dict[str, list[Round]] = {"direct": [], **{name: [] for name in gates}}
            for i in range(rounds):
                order = [("direct", direct), *gates.items()]
                for name, url in order if i % 2 == 0 else order[::-1]:
                    results[name].append(await run_round(url, clients, seconds, stream))
            d = results["direct"]
            for variant in gates:
                g = results[variant]
                row: dict[str, object] = {
                    "mode": "stream" if stream else "plain", "clients": clients, "variant": variant,
                    "direct_p50_ms": median(d, "p50_ms"), "gate_p50_ms": median(g, "p50_ms"),
                    "direct_p99_ms": median(d, "p99_ms"), "gate_p99_ms": median(g, "p99_ms"),
                    "added_p50_ms": median(g, "p50_ms") - median(d, "p50_ms"),
                    "added_p99_ms": median(g, "p99_ms") - median(d, "p99_ms"),
                    "requests": sum(r.requests for r in d + g), "errors": sum(r.errors for r in d + g),
                    "rounds": {k: [asdict(r) for r in results[k]] for k in ("direct", variant)},
                }
                if stream:
                    row["throughput_ratio"] = median(g, "tokens_per_s") / max(median(d, "tokens_per_s"), 1e-9)
                    row["direct_tokens_per_s"] = median(d, "tokens_per_s")
                    row["gate_tokens_per_s"] = median(g, "tokens_per_s")
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict[str, object]) -> str:
    text = (f"{row['mode']:>6} c={row['clients']:<3} {row['variant']:<14} "
            f"p50 direct {row['direct_p50_ms']:7.2f} gate {row['gate_p50_ms']:7.2f} added {row['added_p50_ms']:+6.2f} ms | "
            f"p99 direct {row['direct_p99_ms']:7.2f} gate {row['gate_p99_ms']:7.2f} added {row['added_p99_ms']:+6.2f} ms")
    if "throughput_ratio" in row:
        text += (f" | tok/s direct {row['direct_tokens_per_s']:7.0f} gate {row['gate_tokens_per_s']:7.0f} "
                 f"ratio {row['throughput_ratio']:.3f}")
    return text + f" | n={row['requests']} err={row['errors']}"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.post(url + "/v1/chat/completions", content=CHAT_BODY, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)  # bounded by the deadline: process start-up
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description="gate vs direct latency and throughput")
    parser.add_argument("--serve", choices=("engine", "gate"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="one short round per point (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point and variant (median reported)")
    parser.add_argument("--extra-site", default="",
                        help="directory added to a second gate process's PYTHONPATH (a candidate dependency)")
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
    procs = [subprocess.Popen([*me, "--serve", "engine", "--port", str(engine_port)], env=env)]
    # The gate as installed, and optionally a second gate process that also sees --extra-site (a
    # directory holding e.g. httptools): a candidate dependency judged against the stock one in the same run.
    variants = {"gate": env}
    if args.extra_site:
        variants["gate+extra"] = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [*pythonpath, args.extra_site]))}
    gates: dict[str, str] = {}
    try:
        _wait_up(engine_url, procs[0])
        for name, variant_env in variants.items():
            port = free_port()
            gates[name] = f"http://127.0.0.1:{port}"
            procs.append(subprocess.Popen([*me, "--serve", "gate", "--port", str(port), "--upstream", engine_url],
                                          env=variant_env))
            _wait_up(gates[name], procs[-1])
        rounds, seconds = (1, 1.0) if args.quick else (args.rounds, 1.5)
        print(f"gate bench: rounds={rounds} x {seconds}s, rate={RATE:.0f} req/s with many clients, "
              f"{TOKENS} tokens every {TOKEN_INTERVAL * 1000:.0f} ms when streaming; cpus={os.cpu_count()}; "
              f"httptools={_has('httptools')} extra site={args.extra_site or '-'}")
        rows = anyio.run(measure, engine_url, gates, rounds, seconds)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    summary: dict[str, object] = {"p99_target_ms": 1.0, "throughput_target": 0.95}
    for variant in gates:
        plain50 = next(r for r in rows if r["mode"] == "plain" and r["clients"] == 50 and r["variant"] == variant)
        ratios = [float(r["throughput_ratio"]) for r in rows  # type: ignore[arg-type]
                  if r["mode"] == "stream" and r["variant"] == variant]
        summary[variant] = {"p99_added_ms_plain_50": plain50["added_p99_ms"], "min_stream_throughput_ratio": min(ratios)}
    print(json.dumps(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
