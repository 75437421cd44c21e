"""Helpers for the cloud-source tests."""

from __future__ import annotations

from typing import Any

from spotguard.config import Config


def config_for(url: str, *, request_timeout: float = 1.0, **sections: dict[str, Any]) -> Config:
    """Defaults, every cloud's metadata URL pointed at ``url``, plus per-section overrides."""
    config = Config().replace("agent", request_timeout=request_timeout)
    for cloud in ("aws", "gcp", "azure"):
        config = config.replace(cloud, metadata_url=url, **sections.pop(cloud, {}))
    for section, values in sections.items():
        config = config.replace(section, **values)
    return config
