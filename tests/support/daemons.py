"""Stops the gate processes of the daemons a test started (they outlive the daemon on purpose)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support._daemon import stop_gates


@pytest.fixture(autouse=True)
async def _stop_daemon_gates() -> AsyncIterator[None]:
    yield
    await stop_gates()
