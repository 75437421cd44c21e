"""The model file's sha256, stamped beside KV slot files so a restore can refuse the wrong model.

Hashing a 100 GB model takes minutes: it must never hold up start-up (systemd's start timeout, signals,
READY). The digest is cached in the state directory by path, size and modification time, so only the
first start after a model change pays, and that start computes it in a worker thread in the background.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_FILE = "model-sha256.json"
CHUNK = 8 * 1024 * 1024


def _fingerprint(path: str) -> dict[str, object]:
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_sha256(path: str, cache_dir: str | Path) -> str:
    """The cached digest when the file is unchanged since it was hashed; "" otherwise (or unreadable)."""
    try:
        entry = json.loads((Path(cache_dir) / CACHE_FILE).read_text())
        current = _fingerprint(path)
    except (OSError, ValueError):
        return ""
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in current.items()):
        return ""
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else ""


def sha256_file(path: str) -> str:
    """Hash a (multi-GB) file; blocking, so call it in a worker thread."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def compute_and_cache(path: str, cache_dir: str | Path) -> str:
    """Hash ``path`` and remember it (atomically) in ``cache_dir``. Blocking; raises OSError."""
    before = _fingerprint(path)
    digest = sha256_file(path)
    if _fingerprint(path) != before:
        raise OSError(f"{path} changed while it was being hashed")
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model-sha256-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump({**before, "sha256": digest}, handle)
    os.replace(tmp, directory / CACHE_FILE)
    return digest
