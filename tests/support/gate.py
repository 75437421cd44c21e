"""The gate served on a free loopback port, in front of whatever upstream a test names."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from spotguard.gate.listen import run_gate
from spotguard.gate.protocol import JournalEntry
from spotguard.gate.proxy import Gate
from spotguard.metrics import Metrics


@dataclass(frozen=True)
class RunningGate:
    gate: Gate
    url: str
    metrics: Metrics

    def entries(self) -> list[JournalEntry]:
        """The gate's journaled requests, as the daemon would read them."""
        return self.gate.journal_entries()

    def interrupt_all(self) -> list[JournalEntry]:
        return self.gate.interrupt_all()

    def count(self, endpoint: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "spotguard_gate_requests_total", {"endpoint": endpoint, "result": result})
        return value or 0.0


StartGate = Callable[..., Awaitable[RunningGate]]


@pytest.fixture
async def start_gate() -> AsyncIterator[StartGate]:
    """``await start_gate(upstream_url, **gate_kwargs)`` serves a Gate until the test ends."""
    async with anyio.create_task_group() as tg:
        async def start(upstream: str, **kwargs: Any) -> RunningGate:
            metrics = Metrics()
            gate = Gate(upstream=upstream, metrics=metrics, **kwargs)
            bound = await tg.start(run_gate, gate, "127.0.0.1:0")
            return RunningGate(gate=gate, url=bound.url, metrics=metrics)

        yield start
        tg.cancel_scope.cancel()


@contextlib.contextmanager
def gate_garbage() -> Iterator[set[str]]:
    """The types of the gate's own objects that the code run inside left to the cyclic garbage collector (found
    with ``gc.DEBUG_SAVEALL``; the set is filled in on the way out). A request should leave none: each reference
    cycle left per request is work for a collection that pauses every stream in flight."""
    left: set[str] = set()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield left
        gc.collect()
        kinds = (type(thing) for thing in gc.garbage)
        left.update(kind.__qualname__ for kind in kinds if str(kind.__module__).startswith("spotguard.gate"))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
