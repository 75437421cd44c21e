"""vLLM: SIGTERM drains (with ``--shutdown-timeout``); in-flight from its Prometheus gauges.

On SIGTERM vLLM rejects new requests and waits up to ``--shutdown-timeout`` seconds for running
ones (the default 0 aborts them at once, so set it). ``/health`` stays 200 while it drains, which is
why readiness is failed by the drain itself. ``/pause`` holds requests instead of rejecting them and
is dev-mode only: not a drain.
"""

from __future__ import annotations

import httpx

from spotguard.servers.process import Signaller
from spotguard.servers.signalled import SignalledEngine

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def build(*, signaller: Signaller, http: httpx.AsyncClient, metrics_url: str,
          timeout: float) -> SignalledEngine:
    return SignalledEngine(name="vllm", signaller=signaller, http=http, metrics_url=metrics_url,
                           gauges=GAUGES, prefix="vllm:", timeout=timeout,
                           on_signal="vLLM rejects new requests and finishes running ones within its "
                                     "--shutdown-timeout (0 = aborts them)")
