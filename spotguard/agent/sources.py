"""Watching the notice sources: one poll loop per source, with backoff, health and error counting.

Sources report, they never act (``notice.NoticeSource``): each poll's notices go to the notice book
(``agent/notices.py``), which says which of them are new. A failing source is retried with jittered
exponential backoff, forever (a metadata server busy at boot must not leave the node blind for life), and
counted; an unexpected exception in a source is counted as ``internal`` and never ends its loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import tenacity
from anyio.abc import TaskGroup

from spotguard.config import Config
from spotguard.errors import MetadataError, SpotguardError
from spotguard.metrics import Metrics
from spotguard.notice import Notice, NoticeSource

Report = Callable[[str, Sequence[Notice]], Sequence[Notice]]
"""Hands one poll's notices (by source name) to the notice book; returns those that are new."""


@dataclass
class SourceHealth:
    last_ok: float | None = None
    """Unix time of the last good poll."""
    last_empty: float | None = None
    """Unix time of the last good poll that showed no drain notice."""
    last_error: str = ""
    errors: int = 0
    polls: int = 0


class SourceWatcher:
    """Polls every source in a task of its own and reports what it finds."""

    def __init__(self, *, config: Config, metrics: Metrics, log: Any, report: Report) -> None:
        self._config = config
        self._metrics = metrics
        self._log = log
        self._report = report
        self.sources: list[NoticeSource] = []
        self._health: dict[str, SourceHealth] = {}

    def start(self, tg: TaskGroup, sources: Sequence[NoticeSource]) -> None:
        """Start polling ``sources`` (at start-up, or found later: a cloud confirmed late by a re-probe)."""
        for source in sources:
            self.sources.append(source)
            self._health[source.name] = SourceHealth()
            tg.start_soon(self._poll_forever, source, name=f"poll:{source.name}")

    def health(self) -> dict[str, dict[str, Any]]:
        """Per source, for /healthz and /status."""
        now = time.time()
        return {
            name: {
                "last_ok_age_seconds": round(now - h.last_ok, 3) if h.last_ok else None,
                "polls": h.polls,
                "errors": h.errors,
                "last_error": h.last_error,
            }
            for name, h in self._health.items()
        }

    async def _poll_forever(self, source: NoticeSource) -> None:
        interval = self._config.agent.poll_interval
        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_random_exponential(multiplier=min(0.2, interval),
                                                  max=self._config.agent.max_backoff),
            retry=tenacity.retry_if_exception_type(SpotguardError),
            stop=tenacity.stop_never,
            sleep=anyio.sleep,
            reraise=True,
        )
        while True:
            async for attempt in retrying:
                with attempt:
                    notices = await self._poll_once(source)
            health = self._health[source.name]
            last_empty = health.last_empty
            if not any(n.action == "drain" for n in notices):
                health.last_empty = time.time()
            for new in self._report(source.name, notices):
                if last_empty is not None:
                    # An upper bound: the notice appeared after the last poll that did not show it.
                    bound = max(0.0, new.detected_at.timestamp() - last_empty)
                    self._metrics.detection_latency.labels(source=source.name).observe(bound)
            if not source.hanging:
                await anyio.sleep(source.interval or interval)

    async def _poll_once(self, source: NoticeSource) -> Sequence[Notice]:
        started = time.monotonic()
        try:
            notices = await source.poll()
        except MetadataError as exc:
            self._count_error(source.name, exc.reason, str(exc))
            raise
        except SpotguardError as exc:
            self._count_error(source.name, type(exc).__name__, str(exc))
            raise
        except Exception as exc:  # a bug or an unexpected library error: never let it end the poll loop
            self._count_error(source.name, "internal", f"{type(exc).__name__}: {exc}")
            self._log.exception("poll_internal_error", source=source.name)
            raise SpotguardError(f"{source.name}: {type(exc).__name__}") from exc
        if not source.hanging:
            self._metrics.poll_latency.labels(source=source.name).observe(time.monotonic() - started)
        now = time.time()
        health = self._health[source.name]
        health.polls += 1
        health.last_ok = now
        self._metrics.polls.labels(source=source.name, result="ok").inc()
        self._metrics.last_poll_ok.labels(source=source.name).set(now)
        return notices

    def _count_error(self, source: str, reason: str, message: str) -> None:
        health = self._health[source]
        health.errors += 1
        health.last_error = message
        self._metrics.polls.labels(source=source, result="error").inc()
        self._metrics.poll_errors.labels(source=source, reason=reason).inc()
        self._log.warning("poll_failed", source=source, reason=reason, error=message)
