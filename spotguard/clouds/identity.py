"""Who this VM is, as its cloud knows it: each cloud module's ``identity`` returns one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who this VM is, as the cloud knows it (empty strings where unknown)."""

    cloud: str
    instance_id: str
    private_ip: str = ""
    region: str = ""
    zone: str = ""
    vm_name: str = ""
