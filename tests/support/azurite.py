"""A real Azurite Blob emulator on loopback, one per test session (install: tools/setup-azurite.sh)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest

from tests.support._processes import stop

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's published development account key (not a secret)."""


def azurite_binary() -> Path | None:
    cache = Path(os.environ.get("SPOTGUARD_CACHE") or Path.home() / ".cache" / "spotguard")
    candidate = cache / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if candidate.exists():
        return candidate
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_container(endpoint: str, name: str) -> None:
    """PUT a container with a SharedKey-signed request (obstore cannot create containers)."""
    date = formatdate(usegmt=True)
    version = "2021-08-06"
    headers = {"x-ms-date": date, "x-ms-version": version}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    resource = f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + resource
    signature = base64.b64encode(hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()).decode()
    response = httpx.put(f"{endpoint}/{name}", params={"restype": "container"},
                         headers={**headers, "Authorization": f"SharedKey {ACCOUNT}:{signature}"}, timeout=5)
    if response.status_code not in (201, 409):
        raise RuntimeError(f"Azurite refused to create container {name}: {response.status_code} {response.text}")


@pytest.fixture(scope="session")
def azurite_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Blob endpoint of a running Azurite (``http://127.0.0.1:PORT/devstoreaccount1``); skips if not installed."""
    binary = azurite_binary()
    if binary is None:
        pytest.skip("Azurite is not installed: run tools/setup-azurite.sh (npm, ~25 s, outside the repo)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    log = workdir / "azurite.log"
    with open(log, "wb") as out:
        # cwd: Azurite may write its own files into the working directory; keep them in tmp.
        proc = subprocess.Popen([str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                                 "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"azurite-blob did not start; see {log}") from None
                time.sleep(0.1)  # bounded by the deadline above: process start-up, not a test wait
        yield endpoint
    finally:
        stop(proc)
