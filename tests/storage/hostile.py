"""Building hostile snapshots the way an attacker with write access to the bucket would: raw S3 puts."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import boto3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spotguard.storage import crypto

SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))


def s3(moto_url: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")


def write_config(path: Path, **snapshot: str) -> Path:
    lines = ["[snapshot]"] + [f"{key} = {json.dumps(value)}" for key, value in snapshot.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def entry(name: str, kind: str, stored: bytes, *, encrypted: bool = False, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "size": len(stored), "sha256": hashlib.sha256(stored).hexdigest(),
            "encrypted": encrypted, "request_ids": [], "slot_id": None, "tokens": 0, **extra}


def manifest(objects: list[dict[str, Any]], *, version: int = 2, instance: str = "i-test", event: str = "evt-1",
             encryption: dict[str, str] | None = None) -> dict[str, Any]:
    return {"format": "spotguard-snapshot", "version": version, "instance_id": instance, "event_id": event,
            "source": "manual", "notice_kind": "test", "created_at": "2026-01-01T00:00:00.000Z",
            "completed_at": "2026-01-01T00:00:01.000Z", "complete": True, "requests": len(objects),
            "objects": objects, "missing": [], "encryption": encryption or {}, "server_side_encryption": "",
            "engine": None, "timings": {}}


def record(id: str, endpoint: str = "/v1/chat/completions", **extra: Any) -> dict[str, Any]:
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "count to ten"}]})
    return {"id": id, "endpoint": endpoint, "model": "m", "stream": True, "body": body, "body_encoding": "utf-8",
            "output": "one, two,", "started_at": "2026-01-01T00:00:00.000Z",
            "captured_at": "2026-01-01T00:00:01.000Z", "finish_reason": None, "slot_id": None, **extra}


def encrypt_v1(key: crypto.Key, name: str, plain: bytes) -> bytes:
    """What spotguard's format version 1 wrote: one AES-GCM message under the raw key, name as AD."""
    nonce = os.urandom(12)
    return crypto.MAGIC_V1 + nonce + AESGCM(key.raw).encrypt(nonce, plain, name.encode())


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the real ``spotguard`` command; (exit code, stdout, stderr)."""
    with anyio.fail_after(60):
        done = await anyio.run_process([SPOTGUARD, *args], check=False, env={**os.environ, **(env or {})})
    return done.returncode, done.stdout.decode(), done.stderr.decode()
