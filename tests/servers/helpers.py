"""Building adapters for tests from real configuration, as the daemon does."""

from __future__ import annotations

from typing import Any

import httpx

from spotguard.config import Config


def server_config(**server: Any) -> Config:
    """The default configuration with some ``[server]`` keys set (validated like any other source)."""
    return Config().replace("server", **server)


async def refused(http: httpx.AsyncClient, url: str) -> bool:
    """True when a new connection to ``url`` is refused (the engine's HTTP server has gone away)."""
    try:
        await http.post(url, json={"prompt": "x"}, headers={"connection": "close"})
    except httpx.ConnectError:
        return True
    return False
