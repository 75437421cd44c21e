"""Building adapters for tests from real configuration, as the daemon does."""

from __future__ import annotations

from typing import Any

from spotguard.config import Config


def server_config(**server: Any) -> Config:
    """The default configuration with some ``[server]`` keys set (validated like any other source)."""
    return Config().replace("server", **server)
