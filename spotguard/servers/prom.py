"""Reading an engine's Prometheus text: fetch it (bounded) and sum gauges by name over label sets."""

from __future__ import annotations

import math
from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from spotguard.errors import EngineError
from spotguard.servers.call import call, expect_ok

MAX_METRICS_BYTES = 8 * 1024 * 1024
"""A busy vLLM exports a few hundred KiB; anything near this cap is not an engine's metrics page."""


def metrics_url(url: str, explicit: str) -> str:
    """``[server] metrics_url`` when set, else the engine's base URL + /metrics."""
    return explicit or (f"{url.rstrip('/')}/metrics" if url else "")


def sum_samples(text: str, names: Iterable[str], *, source: str) -> dict[str, float]:
    """For each wanted sample name that appears, the sum of its values over every label set."""
    wanted = set(names)
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    found[sample.name] = found.get(sample.name, 0.0) + float(sample.value)
    except Exception as exc:  # the parser raises ValueError, TypeError, IndexError... on garbage
        raise EngineError(f"{source}: not Prometheus text ({type(exc).__name__}: {str(exc)[:120]})") from None
    for name, value in found.items():
        if not math.isfinite(value) or value < 0:
            raise EngineError(f"{source}: {name} is {value}, not a count")
    return found


def total(text: str, names: Iterable[str], *, prefix: str, source: str) -> int:
    """The sum of the named samples. Absent ones count 0 only when the page is clearly the engine's
    (some sample starts with ``prefix``: engines register some gauges lazily); otherwise EngineError."""
    wanted = tuple(names)
    found = sum_samples(text, wanted, source=source)
    if not found and f"\n{prefix}" not in f"\n{text}":
        raise EngineError(f"{source}: none of {', '.join(wanted)} found; is [server] metrics_url the "
                          "engine's Prometheus endpoint?")
    return round(sum(found.values()))


async def read_total(http: httpx.AsyncClient, url: str, names: Iterable[str], *, prefix: str,
                     timeout: float) -> int:
    """Fetch ``url`` within ``timeout`` seconds and return :func:`total` of ``names``."""
    response = await call(http, "GET", url, timeout=timeout, max_bytes=MAX_METRICS_BYTES)
    expect_ok(response, f"GET {url}")
    return total(response.text, names, prefix=prefix, source=f"GET {url}")
