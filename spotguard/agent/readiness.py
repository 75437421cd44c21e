"""What /readyz answers: 200 only when the node serves, the gate takes work, and the engine is healthy.

Each condition is checked, none assumed: the gate by connecting to its listener (it may be another
process, or not up yet), the engine by its own readiness URL (vLLM answers /health only once the model
is loaded). Checks run about once a second in one task; /readyz reads their last result, so the
endpoint itself does no I/O and a drain flips it at once (the node's state is read live).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from spotguard.config import Config, parse_listen
from spotguard.metrics import Metrics

CHECK_INTERVAL = 1.0
CHECK_TIMEOUT = 1.0
"""Seconds one check may take: a health endpoint slower than this is not one a balancer would trust."""

DEFAULT_HEALTH_PATHS = {"vllm": "/health", "sglang": "/health", "tgi": "/health", "llamacpp": "/health",
                        "triton": "/v2/health/ready"}
"""The engine's own readiness path by kind; http, command and none have none unless [server] health_url."""


def engine_health_url(config: Config) -> str:
    """``[server] health_url``, else the kind's own readiness URL under ``[server] url``; "" = not checked."""
    server = config.server
    if server.health_url:
        return server.health_url
    path = DEFAULT_HEALTH_PATHS.get(server.kind)
    if path is None or not server.url:
        return ""
    return server.url.rstrip("/") + path


def gate_address(config: Config) -> tuple[str, int] | None:
    """Where to connect to reach the gate's listener (a wildcard listen address is reached on loopback)."""
    if not config.gate.listen:
        return None
    host, port = parse_listen(config.gate.listen, "[gate] listen")
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port


@dataclass(frozen=True)
class Check:
    ok: bool | None
    """None until the first check has run."""
    detail: str
    at: float = 0.0


UNCHECKED = Check(None, "not checked yet")


class Readiness:
    """Runs the gate and engine checks; ``verdict`` combines them with the node's live state."""

    def __init__(self, config: Config, http: httpx.AsyncClient, metrics: Metrics, *, state: Callable[[], str],
                 gate_draining: Callable[[], bool], gate_alive: Callable[[], bool], log: Any) -> None:
        self._http = http
        self._metrics = metrics
        self._state = state
        self._gate_draining = gate_draining
        self._gate_alive = gate_alive
        self._log = log
        self.health_url = engine_health_url(config)
        self.gate = gate_address(config)
        self.engine_check = UNCHECKED if self.health_url else Check(True, "not checked (no health URL)")
        self.gate_check = UNCHECKED if self.gate else Check(True, "no gate configured")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check once before reporting started (so the first /readyz is already truthful), then forever."""
        await self.check()
        task_status.started()
        while True:
            await anyio.sleep(CHECK_INTERVAL)
            await self.check()

    async def check(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.health_url:
                tg.start_soon(self._check_engine)
            if self.gate:
                tg.start_soon(self._check_gate)

    async def _check_engine(self) -> None:
        try:
            with anyio.fail_after(CHECK_TIMEOUT):
                response = await self._http.get(self.health_url, timeout=CHECK_TIMEOUT)
            check = Check(response.status_code == 200, f"{self.health_url} answered {response.status_code}")
        except (httpx.HTTPError, TimeoutError) as exc:
            check = Check(False, f"{self.health_url}: {type(exc).__name__}")
        self.engine_check = self._changed("engine", self.engine_check, check)

    async def _check_gate(self) -> None:
        assert self.gate is not None
        host, port = self.gate
        try:
            with anyio.fail_after(CHECK_TIMEOUT):
                stream = await anyio.connect_tcp(host, port)
            await stream.aclose()
            check = Check(True, f"listening on {host}:{port}")
        except (OSError, TimeoutError) as exc:
            check = Check(False, f"not accepting connections on {host}:{port} ({type(exc).__name__})")
        self.gate_check = self._changed("gate", self.gate_check, check)

    def _changed(self, what: str, old: Check, new: Check) -> Check:
        new = Check(new.ok, new.detail, time.time())
        gauge = self._metrics.engine_healthy if what == "engine" else self._metrics.gate_accepting
        gauge.set(1 if new.ok else 0)
        if old.ok is not new.ok:
            log = self._log.info if new.ok else self._log.warning
            log(f"{what}_{'healthy' if new.ok else 'unhealthy'}", detail=new.detail)
            if not new.ok:
                self._metrics.config_errors.labels(component="readiness", reason=f"{what}_down").inc()
        return new

    def verdict(self) -> tuple[bool, list[str]]:
        """(ready, what fails): the state is read now, the checks are the last ones run."""
        failing = []
        state = self._state()
        if state != "serving":
            failing.append(f"node is {state}")
        if not self.gate_check.ok:
            failing.append(f"gate: {self.gate_check.detail}")
        elif self.gate and not self._gate_alive():
            failing.append("gate: its process does not answer on its control socket (cannot be told to drain)")
        elif self.gate and self._gate_draining():
            failing.append("gate: refusing new requests (draining)")
        if not self.engine_check.ok:
            failing.append(f"engine: {self.engine_check.detail}")
        self._metrics.ready.set(0 if failing else 1)
        return not failing, failing

    def describe(self) -> dict[str, Any]:
        """For /status: the verdict and each check."""
        ready, failing = self.verdict()
        return {"ready": ready, "failing": failing,
                "engine": {"healthy": self.engine_check.ok, "detail": self.engine_check.detail,
                           "url": self.health_url or None},
                "gate": {"up": self.gate_check.ok, "detail": self.gate_check.detail}}
