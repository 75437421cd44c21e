"""The shape shared by engines that drain on a signal and count their work in Prometheus gauges."""

from __future__ import annotations

import httpx

from spotguard.errors import EngineError
from spotguard.servers.process import Signaller
from spotguard.servers.prom import read_total


class SignalledEngine:
    """Stops the engine with a signal; in-flight = the sum of some gauges on its metrics page.

    Once the engine has exited its metrics page is gone too: then nothing is in flight any more, and
    in-flight is 0 rather than an error (the requests it held finished or were lost with it).
    """

    def __init__(self, *, name: str, signaller: Signaller, http: httpx.AsyncClient, metrics_url: str,
                 gauges: tuple[str, ...], prefix: str, timeout: float, on_signal: str) -> None:
        self.name = name
        self.signaller = signaller
        self.http = http
        self.metrics_url = metrics_url
        self.gauges = gauges
        self.prefix = prefix
        self.timeout = timeout
        self.on_signal = on_signal

    async def stop_accepting(self, *, dry_run: bool) -> str:
        return f"{await self.signaller.send(dry_run=dry_run)}; {self.on_signal}"

    async def resume_accepting(self, *, dry_run: bool) -> str:
        """The signal made the engine exit: start its unit again (ManualActionRequired without one)."""
        return await self.signaller.start(dry_run=dry_run)

    async def inflight(self) -> int | None:
        try:
            return await read_total(self.http, self.metrics_url, self.gauges, prefix=self.prefix,
                                    timeout=self.timeout)
        except EngineError:
            if await self.signaller.alive() is False:
                return 0
            raise
