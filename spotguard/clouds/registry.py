"""The one place that knows every cloud module: which cloud this is, its notice sources, who this VM is."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx

from spotguard.clouds import aws, azure, gcp
from spotguard.clouds.detect import detect_cloud, dmi_guess, probe
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.errors import SpotguardError
from spotguard.metrics import Metrics
from spotguard.notice import NoticeSource

IDENTITY_TIMEOUT = 10.0
DMI_ROOT = Path("/sys/class/dmi/id")
HYPERVISOR_UUID = Path("/sys/hypervisor/uuid")
PROBE_BACKOFF_MAX = 60.0
"""Most seconds between re-probes while [agent] cloud = auto is not confirmed."""

_SOURCES: dict[str, Callable[[Config, httpx.AsyncClient], Sequence[NoticeSource]]] = {
    "aws": aws.build_sources, "gcp": gcp.build_sources, "azure": azure.build_sources}
_IDENTITY: dict[str, Callable[[Config, httpx.AsyncClient], Awaitable[Identity]]] = {
    "aws": aws.identity, "gcp": gcp.identity, "azure": azure.identity}


async def find_cloud(config: Config, http: httpx.AsyncClient, log: Any, metrics: Metrics, *,
                     dmi_root: Path = DMI_ROOT, hypervisor_uuid: Path = HYPERVISOR_UUID) -> str:
    """The cloud to watch. With ``auto``, a DMI guess that its metadata server does not confirm is probed
    again with backoff, forever: a metadata server busy at boot must not leave the node blind for life."""
    if config.agent.cloud != "auto":
        return config.agent.cloud
    guess = dmi_guess(dmi_root, hypervisor_uuid)
    if guess == "none":
        return await detect_cloud(config, http, dmi_root, hypervisor_uuid)  # logs why, says "none"
    delay = 1.0
    while not await probe(guess, config, http):
        metrics.poll_errors.labels(source="detect", reason="probe_failed").inc()
        log.warning("cloud_unknown", dmi=guess, retry_in=delay,
                    why=f"DMI says {guess} but its metadata endpoint did not answer like one; probing again "
                        f"(set [agent] cloud = \"{guess}\" and [{guess}] metadata_url if this is wrong)")
        await anyio.sleep(delay)
        delay = min(PROBE_BACKOFF_MAX, delay * 2)
    log.info("cloud_detected", cloud=guess)
    return guess


def cloud_sources(cloud: str, config: Config, http: httpx.AsyncClient) -> list[NoticeSource]:
    build = _SOURCES.get(cloud)
    return list(build(config, http)) if build is not None else []


async def cloud_identity(cloud: str, config: Config, http: httpx.AsyncClient, log: Any) -> Identity:
    """Who this VM is; a failure is logged and falls back to the hostname (the drain still runs)."""
    fallback = Identity(cloud=cloud, instance_id=config.agent.instance_id or socket.gethostname())
    lookup = _IDENTITY.get(cloud)
    if lookup is None:
        return fallback
    try:
        with anyio.fail_after(IDENTITY_TIMEOUT):
            found = await lookup(config, http)
    except (SpotguardError, TimeoutError) as exc:
        log.error("identity_unavailable", cloud=cloud, error=str(exc) or "timeout", fallback=fallback.instance_id)
        return fallback
    if config.agent.instance_id:
        found = Identity(cloud=found.cloud, instance_id=config.agent.instance_id, private_ip=found.private_ip,
                         region=found.region, zone=found.zone, vm_name=found.vm_name)
    return found
