"""Cloud detection: a fake DMI tree names the cloud, the emulator (or a dead port) answers the probe."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.clouds.detect import AZURE_ASSET_TAG, detect_cloud, dmi_guess
from tests.clouds.helpers import config_for
from tests.support.emulator import RunningEmulator
from tests.support.moto import free_port

pytestmark = pytest.mark.anyio

DMI = {
    "aws": {"sys_vendor": "Amazon EC2", "product_name": "g5.xlarge"},
    "aws-xen": {"product_uuid": "EC2E1916-9099-7CAF-FD21-012345ABCDEF"},
    "gcp": {"sys_vendor": "Google", "product_name": "Google Compute Engine"},
    "gcp-serial": {"product_serial": "GoogleCloud-0123456789ABCDEF"},
    "azure": {"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
              "chassis_asset_tag": AZURE_ASSET_TAG},
    "hyper-v": {"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
                "chassis_asset_tag": "0000-0000-0000"},
    "laptop": {"sys_vendor": "LENOVO", "product_name": "20XW"},
}


def dmi_tree(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (root / name).write_text(value + "\n")
    return root


@pytest.mark.parametrize(("machine", "cloud"), [
    ("aws", "aws"), ("aws-xen", "aws"), ("gcp", "gcp"), ("gcp-serial", "gcp"), ("azure", "azure"),
    ("hyper-v", "none"), ("laptop", "none")])
async def test_dmi_confirmed_by_probe(emulator: RunningEmulator, http: httpx.AsyncClient, tmp_path: Path,
                                      machine: str, cloud: str) -> None:
    root = dmi_tree(tmp_path / "dmi", DMI[machine])
    with anyio.fail_after(10):
        found = await detect_cloud(config_for(emulator.url), http, root, tmp_path / "no-hypervisor-uuid")
    assert found == cloud


async def test_xen_hypervisor_uuid(emulator: RunningEmulator, http: httpx.AsyncClient, tmp_path: Path) -> None:
    uuid = tmp_path / "uuid"
    uuid.write_text("ec2a1b2c-0000-0000-0000-000000000000\n")
    with anyio.fail_after(10):
        assert await detect_cloud(config_for(emulator.url), http, tmp_path / "missing-dmi", uuid) == "aws"


async def test_probe_that_does_not_answer_means_none(http: httpx.AsyncClient, tmp_path: Path) -> None:
    root = dmi_tree(tmp_path / "dmi", DMI["gcp"])
    dead = f"http://127.0.0.1:{free_port()}"
    with anyio.fail_after(15):
        assert await detect_cloud(config_for(dead, request_timeout=0.3), http, root, tmp_path / "x") == "none"


async def test_probe_must_look_like_that_cloud(emulator: RunningEmulator, http: httpx.AsyncClient,
                                               tmp_path: Path) -> None:
    root = dmi_tree(tmp_path / "dmi", DMI["gcp"])
    with anyio.fail_after(15):
        # a server that answers 200 but is not the GCE metadata server (no Metadata-Flavor header)
        await emulator.control.fault("/computeMetadata/", status=200, body="x")
        assert await detect_cloud(config_for(emulator.url), http, root, tmp_path / "x") == "none"


async def test_explicit_setting_wins_without_looking(http: httpx.AsyncClient, tmp_path: Path) -> None:
    config = config_for("http://127.0.0.1:9").replace("agent", cloud="azure")
    root = dmi_tree(tmp_path / "dmi", DMI["aws"])
    with anyio.fail_after(5):
        assert await detect_cloud(config, http, root, tmp_path / "x") == "azure"


def test_unreadable_or_missing_files_say_nothing(tmp_path: Path) -> None:
    root = dmi_tree(tmp_path / "dmi", {})
    (root / "product_uuid").mkdir()  # reading it fails like a root-only file does
    assert dmi_guess(root, tmp_path / "nope") == "none"
