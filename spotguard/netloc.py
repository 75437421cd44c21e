"""Where a URL points: this machine's loopback or somewhere else (plain http is only private on loopback)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(url: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); any other name is taken as remote."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cleartext(url: str) -> bool:
    """A plain http:// URL to another machine: whatever is sent there can be read on the way."""
    return urlsplit(url).scheme == "http" and not is_loopback(url)


def cleartext_peers(urls: tuple[str, ...] | list[str]) -> list[str]:
    """The peers reached over plain http on another machine: requests and their credentials go in clear."""
    return [url for url in urls if cleartext(url)]
