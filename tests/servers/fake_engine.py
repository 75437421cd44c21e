"""A stand-in inference engine, run as a real process by the adapter tests.

    python fake_engine.py KIND PORT --ready-file F [--pid-file F] [--shutdown-timeout S]
                          [--metrics-port P] [--control-port P] [--models a,b]
                          [--model-control explicit|none] [--slots N] [--no-slots]

KIND is vllm, sglang, tgi, triton or llamacpp. It serves that engine's documented endpoints and
metrics, and reacts to a real SIGTERM the way the engine does:

- vllm: the HTTP server goes away at once (vLLM's launcher cancels its uvicorn server on SIGTERM:
  new connections are refused, /health and /metrics with them), while running work finishes within
  --shutdown-timeout; then it exits;
- sglang: /health turns 503, new requests are refused, running work drains (capped by
  --shutdown-timeout), metrics stay readable until it exits;
- tgi: the router stops accepting connections (HTTP and metrics go away) and finishes in-flight work
  (--shutdown-timeout plays --graceful-termination-timeout);
- triton: /v2/health/ready turns 400, refuses inference, waits --shutdown-timeout (its
  --exit-timeout-secs) with metrics still served; explicit model control through
  /v2/repository/models/{m}/(un)load; metrics on their own port like :8002;
- llamacpp: /slots per slot ``is_processing``; SIGTERM exits at once, abandoning running work.

So where an engine stops answering its metrics page, an adapter sees "cannot read the count" while
the process still drains, as with the real one.

The exit status says how the drain went: 0 = nothing was left in flight, 3 = work was abandoned.
Test hooks, on the engine's port and on a control port that stays up until the process exits:
POST /_test/inflight {"running": n, "waiting": m}; POST /_test/metrics (raw text served as /metrics
from then on); POST /_test/hang (every metrics request hangs from then on); POST /_test/health
{"healthy": false} (the kind's health endpoint - /health, or /v2/health/ready for triton - answers
503, 400 for triton, as while loading a model or after a crash; {"healthy": true} puts it back);
GET /_test/state. Once everything listens, {"port", "metrics_port", "control_port", "pid"} is
written to --ready-file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus

from spotguard.asgi import Receive, Scope, Send, read_body, respond, serve_tcp, tcp_socket

KINDS = ("vllm", "sglang", "tgi", "triton", "llamacpp")
ABANDONED = 3


@dataclass
class Engine:
    kind: str
    shutdown_timeout: float
    explicit: bool
    slots: int
    slots_endpoint: bool
    models: dict[str, bool] = field(default_factory=dict)
    running: int = 0
    waiting: int = 0
    draining: bool = False
    signals: list[str] = field(default_factory=list)
    metrics_override: str | None = None
    hang: bool = False
    healthy: bool = True
    accepted: int = 0
    rejected: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def inflight(self) -> int:
        return self.running + self.waiting

    def poke(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def metrics(self) -> str:
        if self.metrics_override is not None:
            return self.metrics_override
        if self.kind == "vllm":
            return _gauges([("vllm:num_requests_running", 'model_name="tiny"', self.running),
                            ("vllm:num_requests_waiting", 'model_name="tiny"', self.waiting),
                            ("vllm:kv_cache_usage_perc", 'model_name="tiny"', 0.25)])
        if self.kind == "sglang":
            return _gauges([("sglang:num_running_reqs", 'model_name="tiny",tp_rank="0"', self.running),
                            ("sglang:num_queue_reqs", 'model_name="tiny",tp_rank="0"', self.waiting)])
        if self.kind == "tgi":
            return _gauges([("tgi_batch_current_size", "", self.running), ("tgi_queue_size", "", self.waiting)])
        if self.kind == "triton":
            names = list(self.models) or ["tiny"]
            # Running work on the first model, queued work on the last: the adapter must sum label sets.
            rows = [("nv_inference_pending_request_count", f'model="{name}",version="1"',
                     (self.running if i == 0 else 0) + (self.waiting if i == len(names) - 1 else 0))
                    for i, name in enumerate(names)]
            return _gauges(rows)
        return ""


def _gauges(rows: Sequence[tuple[str, str, float]]) -> str:
    lines: list[str] = []
    for name in dict.fromkeys(row[0] for row in rows):
        lines += [f"# HELP {name} fake engine gauge", f"# TYPE {name} gauge"]
        lines += [f"{n}{{{labels}}} {value}" if labels else f"{n} {value}" for n, labels, value in rows if n == name]
    return "\n".join(lines) + "\n"


def make_app(engine: Engine) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path.startswith("/_test/"):
            await _test_hook(engine, method, path, receive, send)
        elif path == "/metrics" and engine.kind != "triton":
            await _metrics(engine, send)
        elif engine.kind == "triton":
            await _triton(engine, method, path, send)
        elif engine.kind == "llamacpp":
            await _llamacpp(engine, method, path, send)
        elif path == "/health":
            sick = (engine.kind == "sglang" and engine.draining) or not engine.healthy
            await respond(send, 503 if sick else 200, "")
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            await _generate(engine, send)
        else:
            await respond(send, 404, "not found")

    return app


async def _test_hook(engine: Engine, method: str, path: str, receive: Receive, send: Send) -> None:
    if method == "POST" and path == "/_test/inflight":
        body = json.loads(await read_body(receive) or b"{}")
        engine.running, engine.waiting = int(body.get("running", 0)), int(body.get("waiting", 0))
        engine.poke()
    elif method == "POST" and path == "/_test/metrics":
        engine.metrics_override = (await read_body(receive)).decode("utf-8", errors="replace")
    elif method == "POST" and path == "/_test/hang":
        engine.hang = True
    elif method == "POST" and path == "/_test/health":
        body = json.loads(await read_body(receive) or b"{}")
        engine.healthy = bool(body.get("healthy", True))
    elif path != "/_test/state":
        await respond(send, 404, "no such hook")
        return
    state = {"kind": engine.kind, "draining": engine.draining, "signals": engine.signals,
             "running": engine.running, "waiting": engine.waiting, "models": engine.models,
             "accepted": engine.accepted, "rejected": engine.rejected, "healthy": engine.healthy}
    await respond(send, 200, json.dumps(state), content_type="application/json")


async def _metrics(engine: Engine, send: Send) -> None:
    if engine.hang:
        await anyio.sleep_forever()
    await respond(send, 200, engine.metrics(), content_type="text/plain; version=0.0.4")


async def _generate(engine: Engine, send: Send) -> None:
    if engine.draining:
        engine.rejected += 1
        await respond(send, 503, json.dumps({"error": "server is shutting down"}), content_type="application/json")
        return
    engine.accepted += 1
    await respond(send, 200, json.dumps({"choices": [{"text": "ok"}]}), content_type="application/json")


async def _triton(engine: Engine, method: str, path: str, send: Send) -> None:
    parts = path.strip("/").split("/")
    if path == "/v2/health/ready":
        await respond(send, 400 if engine.draining or not engine.healthy else 200, "")
    elif method == "POST" and len(parts) == 5 and parts[:3] == ["v2", "repository", "models"] \
            and parts[4] in ("load", "unload"):
        model, action = parts[3], parts[4]
        if not engine.explicit:
            error = f"explicit model load / unload is not allowed if polling is enabled ({model})"
            await respond(send, 400, json.dumps({"error": error}), content_type="application/json")
        elif model not in engine.models:
            await respond(send, 400, json.dumps({"error": f"failed to {action} '{model}', no version is available"}),
                          content_type="application/json")
        else:
            engine.models[model] = action == "load"
            await respond(send, 200, "", content_type="application/json")
    elif method == "POST" and len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer":
        if engine.draining or not engine.models.get(parts[2], False):
            engine.rejected += 1
            await respond(send, 400, json.dumps({"error": f"Request for unknown model: '{parts[2]}' is not ready"}),
                          content_type="application/json")
        else:
            engine.accepted += 1
            await respond(send, 200, json.dumps({"model_name": parts[2], "outputs": []}),
                          content_type="application/json")
    else:
        await respond(send, 404, json.dumps({"error": "Not Found"}), content_type="application/json")


async def _llamacpp(engine: Engine, method: str, path: str, send: Send) -> None:
    if path == "/health":
        if not engine.healthy:
            await respond(send, 503, json.dumps({"error": {"code": 503, "message": "Loading model",
                                                           "type": "unavailable_error"}}),
                          content_type="application/json")
            return
        await respond(send, 200, json.dumps({"status": "ok"}), content_type="application/json")
    elif path == "/slots" and method == "GET":
        if engine.hang:
            await anyio.sleep_forever()
        if not engine.slots_endpoint:
            await respond(send, 501, json.dumps({"error": {"code": 501, "message": "This server does not support "
                          "slots endpoint.", "type": "not_supported_error"}}), content_type="application/json")
            return
        if engine.metrics_override is not None:
            await respond(send, 200, engine.metrics_override, content_type="application/json")
            return
        slots = [{"id": i, "n_ctx": 4096, "is_processing": i < engine.running, "n_prompt_tokens": 12 if i < engine.running
                  else 0, "next_token": [{"has_next_token": i < engine.running, "n_decoded": 7 if i < engine.running
                                          else 0}]} for i in range(engine.slots)]
        await respond(send, 200, json.dumps(slots), content_type="application/json")
    elif method == "POST" and path in ("/completion", "/v1/completions"):
        await _generate(engine, send)
    else:
        await respond(send, 404, "not found")


async def _drain(engine: Engine) -> int:
    """What the engine does on SIGTERM; returns the exit status."""
    engine.draining = True
    if engine.kind == "llamacpp":
        return ABANDONED if engine.inflight else 0
    with anyio.move_on_after(engine.shutdown_timeout):
        while engine.inflight:
            await engine.changed.wait()
    return ABANDONED if engine.inflight else 0


LISTENER_GOES_AWAY = frozenset({"vllm", "tgi"})
"""Kinds whose HTTP server stops accepting connections on SIGTERM while the drain goes on."""


class _Listener(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM is the engine's, handled in ``run``."""

    def install_signal_handlers(self) -> None:
        return None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Listening:
    """One of the engine's own uvicorn servers, and an event set once it has stopped."""

    server: _Listener
    stopped: anyio.Event = field(default_factory=anyio.Event)

    async def close(self) -> None:
        """Stop it as uvicorn does on SIGTERM: the listener closes first (new connections are refused),
        then open connections get a moment. Returns once it is closed."""
        self.server.should_exit = True
        with anyio.move_on_after(10):
            await self.stopped.wait()


async def _listen(app: Any, port: int, listeners: list[Listening], *,
                  task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until closed (``Listening.close``)."""
    sock = tcp_socket("127.0.0.1", port)
    listening = Listening(_Listener(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                                   timeout_graceful_shutdown=1)))
    listeners.append(listening)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listening.server.serve, [sock])
            with anyio.fail_after(10):
                while not listening.server.started:
                    await anyio.sleep(0.005)
            task_status.started(int(sock.getsockname()[1]))
    finally:
        listening.stopped.set()


async def run(args: argparse.Namespace) -> int:
    models = {name: True for name in args.models.split(",") if name}
    engine = Engine(kind=args.kind, shutdown_timeout=args.shutdown_timeout, explicit=args.model_control == "explicit",
                    slots=args.slots, slots_endpoint=not args.no_slots, models=models)
    status = 0
    async with anyio.create_task_group() as tg:
        control = await tg.start(serve_tcp, make_control_app(engine), "127.0.0.1", args.control_port)
        listeners: list[Listening] = []
        port = metrics_port = await tg.start(_listen, make_app(engine), args.port, listeners)
        if args.kind == "triton":
            metrics_port = await tg.start(_listen, make_metrics_app(engine), args.metrics_port, listeners)
        # Opened after the servers start, so that this receiver is the one handling SIGTERM/SIGINT.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            if args.pid_file:
                Path(args.pid_file).write_text(f"{os.getpid()}\n")
            ready = Path(args.ready_file)
            ready.with_suffix(".tmp").write_text(json.dumps({"port": port, "metrics_port": metrics_port,
                                                             "control_port": control.port, "pid": os.getpid()}))
            ready.with_suffix(".tmp").rename(ready)
            async for signum in signals:
                if not engine.signals and args.kind in LISTENER_GOES_AWAY:
                    for listener in listeners:
                        await listener.close()
                # Recorded once the engine has reacted, so a test that saw the signal sees its effect.
                engine.signals.append(signal.Signals(signum).name)
                if len(engine.signals) == 1:
                    status = await _drain(engine)
                    tg.cancel_scope.cancel()
                    break
    return status


def make_control_app(engine: Engine) -> Any:
    """Only the test hooks: reachable while the engine's own listener is gone."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/_test/"):
            await _test_hook(engine, scope["method"], scope["path"], receive, send)
        elif scope["type"] == "http":
            await respond(send, 404, "not found")

    return app


def make_metrics_app(engine: Engine) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await _metrics(engine, send)
        elif scope["type"] == "http":
            await respond(send, 404, "not found")

    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("port", type=int)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--pid-file", default="")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--models", default="")
    parser.add_argument("--model-control", choices=("explicit", "none"), default="none")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--no-slots", action="store_true")
    return anyio.run(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
