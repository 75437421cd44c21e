"""A stand-in inference engine for the drain benchmark, run as its own process.

    python bench/_engine.py PORT STOPS_FILE

It shows vLLM's in-flight gauges on ``GET /metrics`` and drains on SIGTERM the way vLLM does: it
appends the wall-clock time the signal arrived to STOPS_FILE (the benchmark's "stop delivered"
instant), then keeps reporting running requests until they finish. ``POST /mode?finish_after=S``
sets how long the running requests take after the signal (``inf`` = an engine that never finishes)
and puts it back to serving for the next trial. Stdlib only: it stands for a process outside ours.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlsplit

RUNNING_WHILE_SERVING = 4
state = {"finish_after": 1.0, "stopped_at": math.nan}


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    now = time.time()
    state["stopped_at"] = now
    with open(sys.argv[2], "a") as stops:
        stops.write(f"{now:.6f}\n")


def running() -> int:
    stopped = state["stopped_at"]
    if math.isnan(stopped) or time.time() - stopped < state["finish_after"]:
        return RUNNING_WHILE_SERVING
    return 0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = (f"vllm:num_requests_running {running()}\nvllm:num_requests_waiting 0\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        query = parse_qs(urlsplit(self.path).query)
        state["finish_after"] = float(query.get("finish_after", ["1.0"])[0])
        state["stopped_at"] = math.nan
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    server.serve_forever(poll_interval=0.05)
