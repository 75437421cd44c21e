"""The metadata emulator (AWS, GCP, Azure) served in-process on loopback, one per test.

    async def test_x(emulator: RunningEmulator) -> None:
        event_id = await emulator.control.raise_notice("aws", "spot", in_seconds=120)
        ... point the code under test at emulator.url ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest

from spotguard.asgi import Bound
from spotguard.emulator import EmulatedInstance, EmulatorApp, EmulatorControl, run_emulator


@dataclass(frozen=True)
class RunningEmulator:
    url: str
    """Base URL: use it as the metadata URL of every cloud (paths do not collide)."""
    control: EmulatorControl
    app: EmulatorApp
    """The served app itself, for tests that want to look at its state directly."""

    @property
    def instance(self) -> EmulatedInstance:
        return self.app.instance


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    """A fresh emulator on 127.0.0.1 (IMDSv2 required), stopped after the test."""
    app = EmulatorApp()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            bound: Bound = await tg.start(run_emulator, "127.0.0.1", 0, app)
        control = EmulatorControl(bound.url)
        try:
            yield RunningEmulator(bound.url, control, app)
        finally:
            with anyio.move_on_after(5, shield=True):
                await control.aclose()
            tg.cancel_scope.cancel()
