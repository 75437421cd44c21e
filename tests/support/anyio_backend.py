"""Runs every async test on anyio's asyncio backend (obstore needs asyncio)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
