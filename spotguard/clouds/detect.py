"""Which cloud is this VM on: DMI says, a probe of that cloud's metadata endpoint confirms.

``[agent] cloud`` other than ``auto`` wins without looking. DMI alone can be wrong (a Hyper-V or KVM
guest off-cloud can copy vendor strings) and a metadata address alone is ambiguous (AWS and Azure both
use 169.254.169.254), so both must agree; otherwise the answer is ``none`` and the log says which
setting to use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from spotguard.clouds import fetch
from spotguard.clouds._parse import header
from spotguard.config import Config
from spotguard.errors import MetadataError

AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
PROBE_ATTEMPTS = 3
"""A metadata server can be briefly busy at boot; three tries inside a few seconds tell that apart from
an endpoint that is not there."""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[:256]
    except OSError:  # missing, or root-only (product_uuid): that file simply says nothing
        return ""


def dmi_guess(dmi_root: Path, hypervisor_uuid: Path) -> str:
    """The cloud the DMI strings name ("aws", "gcp", "azure"), or "none"."""
    def dmi(name: str) -> str:
        return _read(dmi_root / name)

    if (_read(hypervisor_uuid).lower().startswith("ec2") or dmi("product_uuid").lower().startswith("ec2")
            or dmi("sys_vendor") == "Amazon EC2"):
        return "aws"
    if dmi("product_name") == "Google Compute Engine" or dmi("product_serial").startswith("GoogleCloud-"):
        return "gcp"
    if dmi("chassis_asset_tag") == AZURE_ASSET_TAG:
        return "azure"
    return "none"


async def _probe_aws(config: Config, http: httpx.AsyncClient) -> bool:
    url = config.aws.metadata_url.rstrip("/") + "/latest/meta-data/instance-id"
    response = await fetch.request(http, "GET", url, timeout=config.agent.request_timeout)
    return response.status in (200, 401)  # 401 = IMDSv2 required: an IMDS nevertheless


async def _probe_gcp(config: Config, http: httpx.AsyncClient) -> bool:
    url = config.gcp.metadata_url.rstrip("/") + "/computeMetadata/v1/instance/id"
    response = await fetch.request(http, "GET", url, headers={"Metadata-Flavor": "Google"},
                                   timeout=config.agent.request_timeout)
    return response.status == 200 and header(response.headers, "Metadata-Flavor") == "Google"


async def _probe_azure(config: Config, http: httpx.AsyncClient) -> bool:
    url = config.azure.metadata_url.rstrip("/") + "/metadata/instance/compute/name"
    response = await fetch.request(http, "GET", url, headers={"Metadata": "true"},
                                   params={"api-version": "2021-02-01", "format": "text"},
                                   timeout=config.agent.request_timeout)
    return response.status == 200


def _probe_for(cloud: str) -> Callable[[Config, httpx.AsyncClient], Awaitable[bool]]:
    return {"aws": _probe_aws, "gcp": _probe_gcp, "azure": _probe_azure}[cloud]


async def probe(cloud: str, config: Config, http: httpx.AsyncClient) -> bool:
    """True when ``cloud``'s metadata endpoint answers like that cloud's (a few tries, bounded)."""
    budget = PROBE_ATTEMPTS * (config.agent.request_timeout + 1.0)
    try:
        async for attempt in AsyncRetrying(stop=stop_after_attempt(PROBE_ATTEMPTS) | stop_after_delay(budget),
                                           wait=wait_exponential(multiplier=0.2, max=1.0),
                                           retry=retry_if_exception_type(MetadataError), reraise=True):
            with attempt:
                return await _probe_for(cloud)(config, http)
    except MetadataError:
        return False
    return False  # pragma: no cover - AsyncRetrying either returns through the block or raises


async def detect_cloud(config: Config, http: httpx.AsyncClient, dmi_root: Path = Path("/sys/class/dmi/id"),
                       hypervisor_uuid: Path = Path("/sys/hypervisor/uuid")) -> str:
    """"aws", "gcp", "azure" or "none"."""
    if config.agent.cloud != "auto":
        return config.agent.cloud
    log = structlog.get_logger("spotguard.clouds.detect")
    guess = dmi_guess(dmi_root, hypervisor_uuid)
    if guess == "none":
        log.info("cloud_detected", cloud="none", why="no cloud named in DMI; set [agent] cloud to override")
        return "none"
    if not await probe(guess, config, http):
        log.warning("cloud_not_confirmed", dmi=guess,
                    why=f"DMI says {guess} but its metadata endpoint did not answer like one; "
                        f"set [agent] cloud = \"{guess}\" (and [{guess}] metadata_url) if this is wrong")
        return "none"
    log.info("cloud_detected", cloud=guess)
    return guess
