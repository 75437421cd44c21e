"""Triton Inference Server: unload models (explicit model control) or SIGTERM; in-flight from :8002.

With ``--model-control-mode=explicit`` and ``[server] triton_models`` set, each model is unloaded with
``POST /v2/repository/models/{m}/unload`` and the server keeps running. Otherwise SIGTERM makes Triton
refuse new requests and wait up to ``--exit-timeout-secs`` (default 30) for in-flight ones. In-flight
is ``nv_inference_pending_request_count`` summed over models, from the metrics port (8002 by default).
Undrain loads the models again (``POST /v2/repository/models/{m}/load``), or starts the unit SIGTERM stopped.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from spotguard.errors import EngineError
from spotguard.servers.call import call, expect_ok
from spotguard.servers.process import Signaller
from spotguard.servers.prom import read_total

METRICS_PORT = 8002
GAUGES = ("nv_inference_pending_request_count",)


def default_metrics_url(url: str) -> str:
    """Triton serves metrics on its own port: ``url``'s host, port 8002, /metrics."""
    if not url:
        return ""
    return str(httpx.URL(url).copy_with(port=METRICS_PORT, path="/metrics", query=None, fragment=None))


class TritonAdapter:
    name = "triton"

    def __init__(self, *, http: httpx.AsyncClient, url: str, metrics_url: str, models: tuple[str, ...],
                 signaller: Signaller, timeout: float) -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.metrics_url = metrics_url
        self.models = models
        self.signaller = signaller
        self.timeout = timeout

    def _model_url(self, model: str, action: str) -> str:
        return f"{self.url}/v2/repository/models/{quote(model, safe='')}/{action}"

    async def stop_accepting(self, *, dry_run: bool) -> str:
        if not self.models:
            detail = await self.signaller.send(dry_run=dry_run)
            return f"{detail}; Triton refuses new requests and waits up to its --exit-timeout-secs"
        if dry_run:
            where = f"{self.url}/v2/repository/models/<model>/unload"
            return f"would unload {', '.join(self.models)} (POST {where})"
        # Unload every model even when one fails: each one unloaded is one fewer taking work.
        failures: list[str] = []
        for model in self.models:
            try:
                response = await call(self.http, "POST", self._model_url(model, "unload"), timeout=self.timeout,
                                      content=b"", headers={"content-type": "application/json"})
                expect_ok(response, f"unload {model}")
            except EngineError as exc:
                failures.append(str(exc))
        if failures:
            done = len(self.models) - len(failures)
            raise EngineError(f"Triton unloaded {done} of {len(self.models)} models; " + "; ".join(failures)
                              + " (explicit model control needs --model-control-mode=explicit)")
        return f"unloaded {', '.join(self.models)}"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        """Load the models again (explicit model control), or start the unit a SIGTERM stopped."""
        if not self.models:
            return await self.signaller.start(dry_run=dry_run)
        if dry_run:
            return f"would load {', '.join(self.models)} (POST {self.url}/v2/repository/models/<model>/load)"
        failures: list[str] = []
        for model in self.models:
            try:
                response = await call(self.http, "POST", self._model_url(model, "load"), timeout=self.timeout,
                                      content=b"", headers={"content-type": "application/json"})
                expect_ok(response, f"load {model}")
            except EngineError as exc:
                failures.append(str(exc))
        if failures:
            done = len(self.models) - len(failures)
            raise EngineError(f"Triton loaded {done} of {len(self.models)} models; " + "; ".join(failures))
        return f"loaded {', '.join(self.models)}"

    async def inflight(self) -> int | None:
        try:
            return await read_total(self.http, self.metrics_url, GAUGES, prefix="nv_", timeout=self.timeout)
        except EngineError:
            if not self.models and await self.signaller.alive() is False:
                return 0
            raise
