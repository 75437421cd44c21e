"""Start-up wiring: the cloud is attached in the background, and an unconfirmed ``auto`` keeps probing."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from spotguard import logs
from spotguard.clouds.registry import find_cloud
from spotguard.config import load
from spotguard.metrics import Metrics
from tests.support.emulator import RunningEmulator

pytestmark = pytest.mark.anyio


def gce_dmi(tmp_path: Path) -> Path:
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "product_name").write_text("Google Compute Engine\n")
    return dmi


async def test_an_unconfirmed_cloud_is_probed_again_until_it_answers(tmp_path: Path,
                                                                       emulator: RunningEmulator) -> None:
    # The metadata server is busy at boot (503 for the first tries): a single failed probe used to leave the
    # daemon blind to notices for its whole life.
    config = load(None, environ={}, overrides={"agent": {"request_timeout": 0.5},
                                               "gcp": {"metadata_url": emulator.url}})
    await emulator.control.fault("/computeMetadata/v1/instance/id", status=503, count=6)
    metrics = Metrics()
    logs.configure("json", "error")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(30):
            cloud = await find_cloud(config, http, logs.get("test"), metrics, dmi_root=gce_dmi(tmp_path),
                                     hypervisor_uuid=tmp_path / "none")
    assert cloud == "gcp"
    assert metrics.poll_errors.labels(source="detect", reason="probe_failed")._value.get() >= 1


async def test_no_cloud_in_dmi_is_none_at_once(tmp_path: Path) -> None:
    config = load(None, environ={}, overrides={})
    empty = tmp_path / "dmi"
    empty.mkdir()
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(5):
            assert await find_cloud(config, http, logs.get("test"), Metrics(), dmi_root=empty,
                                    hypervisor_uuid=tmp_path / "none") == "none"
