"""Text Generation Inference: SIGTERM makes the router stop accepting and finish in-flight requests.

TGI kills what is left after ``--graceful-termination-timeout`` (default 90 s) and ``/health`` does not
change while it drains. Its gauges are registered on first use, so a fresh server may export neither.
"""

from __future__ import annotations

import httpx

from spotguard.servers.process import Signaller
from spotguard.servers.signalled import SignalledEngine

GAUGES = ("tgi_batch_current_size", "tgi_queue_size")


def build(*, signaller: Signaller, http: httpx.AsyncClient, metrics_url: str,
          timeout: float) -> SignalledEngine:
    return SignalledEngine(name="tgi", signaller=signaller, http=http, metrics_url=metrics_url,
                           gauges=GAUGES, prefix="tgi_", timeout=timeout,
                           on_signal="TGI stops accepting and finishes in-flight requests within its "
                                     "--graceful-termination-timeout")
