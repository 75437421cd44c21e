"""The read-only HTTP endpoints on one listener: /healthz, /readyz, /metrics, /status.

Nothing here mutates state: drain and undrain exist only on the local control socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from spotguard import asgi
from spotguard.metrics import Metrics


class StatusView(Protocol):
    cloud: str

    def status(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, dict[str, Any]]: ...


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


Verdict = Callable[[], tuple[bool, list[str]]]
"""(ready, what fails): see ``agent/readiness.py``."""


class HttpApi:
    """ASGI app of the read-only endpoints; GPU gauges are kept fresh by the daemon's monitor task."""

    def __init__(self, view: StatusView, metrics: Metrics, readiness: Verdict) -> None:
        self.view = view
        self.readiness = readiness
        self.metrics = metrics

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method not in ("GET", "HEAD"):
            await asgi.respond(send, 405, "read-only endpoint: use the control socket to drain\n",
                               headers=[(b"allow", b"GET, HEAD")])
            return
        if path == "/readyz":
            ready, failing = self.readiness()
            await asgi.respond(send, 200 if ready else 503,
                               "serving\n" if ready else "not ready: " + "; ".join(failing) + "\n")
        elif path == "/healthz":
            # Liveness: 200 through drains (nothing should restart a draining daemon); "cloud" says
            # "unknown" while [agent] cloud = auto is not confirmed yet.
            await asgi.respond(send, 200, _json({"alive": True, "cloud": self.view.cloud,
                                                 "sources": self.view.health()}),
                               content_type="application/json")
        elif path == "/status":
            await asgi.respond(send, 200, _json(self.view.status()), content_type="application/json")
        elif path == "/metrics":
            await asgi.respond(send, 200, self.metrics.render(), content_type=CONTENT_TYPE_LATEST)
        else:
            await asgi.respond(send, 404, "not found: /healthz /readyz /metrics /status\n")
