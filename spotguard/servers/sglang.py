"""SGLang: SIGTERM makes ``/health`` answer 503 and drains running requests; in-flight from its gauges."""

from __future__ import annotations

import httpx

from spotguard.servers.process import Signaller
from spotguard.servers.signalled import SignalledEngine

GAUGES = ("sglang:num_running_reqs", "sglang:num_queue_reqs")


def build(*, signaller: Signaller, http: httpx.AsyncClient, metrics_url: str,
          timeout: float) -> SignalledEngine:
    return SignalledEngine(name="sglang", signaller=signaller, http=http, metrics_url=metrics_url,
                           gauges=GAUGES, prefix="sglang:", timeout=timeout,
                           on_signal="SGLang answers /health with 503 and drains running requests")
