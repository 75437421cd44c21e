"""Stops the gate processes of the daemons a test started (they outlive the daemon on purpose)."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from tests.support._daemon import STARTED_CONFIGS, stop_gates


@pytest.fixture(autouse=True)
def _stop_daemon_gates() -> Iterator[None]:
    yield
    if STARTED_CONFIGS:  # sync on purpose: autouse for every test, async or not
        anyio.run(stop_gates)
