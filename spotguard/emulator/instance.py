"""Who the emulated VM is: fixed identity values each cloud's metadata reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class EmulatedInstance:
    """The one VM the emulator pretends to be, seen through AWS, GCP and Azure metadata at once."""

    # AWS
    instance_id: str = "i-0123456789abcdef0"
    local_ipv4: str = "10.0.0.12"
    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    mac: str = "0e:49:61:0f:c3:11"
    instance_type: str = "g5.xlarge"
    # GCP
    gcp_instance_id: str = "4520031799277581759"
    gcp_name: str = "spotguard-vm"
    gcp_zone: str = "us-central1-a"
    gcp_project_id: str = "spotguard-test"
    gcp_project_number: str = "123456789012"
    gcp_ip: str = "10.128.0.7"
    # Azure
    vm_name: str = "spotguard-vm"
    vm_id: str = "02aab8a4-74ef-476e-8182-f6d2ba4166a6"
    subscription_id: str = "8d10da13-8125-4ba9-a717-bf7490507b3d"
    resource_group: str = "spotguard-rg"
    location: str = "eastus"
    azure_ip: str = "10.1.0.4"
    azure_client_id: str = "7d0a5b0c-6d4e-4b8f-9a51-3c2b0f9c1e2d"
