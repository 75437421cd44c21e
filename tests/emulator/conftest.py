"""A plain httpx client on the emulator's base URL, for tests that speak metadata directly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.emulator import RunningEmulator


@pytest.fixture
async def client(emulator: RunningEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5) as http:
        yield http
