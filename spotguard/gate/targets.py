"""Where an exchange sends its request: the engine behind the gate, or a peer that takes work over.

A target is a base URL with its own kept-alive connection pool; it writes the request head the way the
target expects it (its Host, its path prefix) plus any headers the gate adds (the loop guard).

An https target is verified against the system's CA store; ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` in the
gate's environment name another bundle (OpenSSL reads them), e.g. a private CA for the fleet's peers.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from spotguard.errors import ConfigError
from spotguard.gate.request import HOP_BY_HOP, Request
from spotguard.gate.upstream import UpstreamPool

NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}


class Target:
    def __init__(self, url: str, *, connect_timeout: float, what: str = "[gate] upstream",
                 withheld: frozenset[bytes] = frozenset()) -> None:
        """``withheld``: header names (lower case) never sent to this target."""
        base = urlsplit(url)
        if base.scheme not in ("http", "https") or not base.hostname:
            raise ConfigError(f"{what}: expected a base URL like http://127.0.0.1:8080, got {url!r}")
        tls = base.scheme == "https"
        self.url = url.rstrip("/")
        self.host_line = b"host: " + base.netloc.rpartition("@")[2].encode("idna") + b"\r\n"
        self.prefix = base.path.rstrip("/").encode()
        self._not_forwarded = NOT_FORWARDED | withheld
        self.pool = UpstreamPool(host=base.hostname, port=base.port or (443 if tls else 80),
                                 tls=ssl.create_default_context() if tls else None, connect_timeout=connect_timeout)

    def head(self, request: Request, length: int | None, chunked: bool,
             extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        parts = [request.method, b" ", self.prefix, request.target, b" HTTP/1.1\r\n", self.host_line]
        not_forwarded = self._not_forwarded
        for name, value in request.headers:
            if name.lower() not in not_forwarded:
                parts += (name, b": ", value, b"\r\n")
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)
