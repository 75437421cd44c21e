"""The snapshot format (version 1): continuation records, KV slot metadata and the manifest.

Layout under ``<snapshot url>/<instance_id>/<event_id>/``::

    records/000000.jsonl   continuation records, one JSON object per line (written first)
    kv/slot-<n>.bin        llama.cpp slot file (tokens + KV cache), where the engine can export one
    kv/slot-<n>.json       what the slot file needs to be usable: model sha256, n_ctx, slots, KV types
    manifest.json          written LAST; without it the snapshot is incomplete

docs/snapshots.md is the prose reference of these fields.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from spotguard.errors import StoreError

FORMAT = "spotguard-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
RECORDS_DIR = "records"
KV_DIR = "kv"

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_segment(text: str) -> str:
    """A path segment that is the same on every store (instance ids and event ids can hold anything)."""
    cleaned = _SAFE.sub("_", text).strip("._") or "unknown"
    return cleaned[:128]


@dataclass(frozen=True, kw_only=True)
class ContinuationRecord:
    """Everything another server needs to continue a request where it stopped."""

    id: str
    endpoint: str
    model: str
    stream: bool
    body: str
    body_encoding: str
    """utf-8 when ``body`` is the original text; base64 when the original bytes were not UTF-8."""
    output: str
    started_at: str
    captured_at: str
    finish_reason: str | None = None
    slot_id: int | None = None

    @staticmethod
    def encode_body(raw: bytes) -> tuple[str, str]:
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii"), "base64"

    def body_bytes(self) -> bytes:
        return base64.b64decode(self.body) if self.body_encoding == "base64" else self.body.encode("utf-8")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Any) -> ContinuationRecord:
        if not isinstance(data, dict):
            raise StoreError("continuation record: expected a JSON object")
        try:
            return cls(id=str(data["id"]), endpoint=str(data["endpoint"]), model=str(data["model"]),
                       stream=bool(data["stream"]), body=str(data["body"]),
                       body_encoding=_choice(data.get("body_encoding", "utf-8"), ("utf-8", "base64")),
                       output=str(data["output"]), started_at=str(data["started_at"]),
                       captured_at=str(data["captured_at"]),
                       finish_reason=None if data.get("finish_reason") is None else str(data["finish_reason"]),
                       slot_id=None if data.get("slot_id") is None else int(data["slot_id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"continuation record: missing or bad field ({exc})") from None


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} not in {allowed}")
    return str(value)


def parse_records(text: str) -> list[ContinuationRecord]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(ContinuationRecord.from_json(json.loads(line)))
        except json.JSONDecodeError:
            raise StoreError(f"records line {number}: not JSON") from None
    return records


@dataclass(frozen=True, kw_only=True)
class EngineState:
    """Facts a llama.cpp slot file depends on; the file itself carries no model fingerprint."""

    kind: str
    model_sha256: str = ""
    model_path: str = ""
    n_ctx: int = 0
    total_slots: int = 0
    kv_cache_types: str = ""
    build_info: str = ""


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One stored object. ``sha256`` and ``size`` are of the stored bytes (ciphertext when encrypted)."""

    name: str
    kind: str
    """records | kv | kv_meta"""
    size: int
    sha256: str
    encrypted: bool
    request_ids: tuple[str, ...] = ()
    slot_id: int | None = None
    tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class Missing:
    """Something that should be in the snapshot and is not, and why."""

    what: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    instance_id: str
    event_id: str
    source: str
    notice_kind: str
    created_at: str
    completed_at: str
    complete: bool
    requests: int
    """In-flight requests seen when the snapshot began."""
    objects: tuple[Entry, ...]
    missing: tuple[Missing, ...] = ()
    encryption: dict[str, str] = field(default_factory=dict)
    server_side_encryption: str = ""
    engine: EngineState | None = None
    timings: dict[str, float] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> bytes:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError("manifest.json is not JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError("manifest.json is not a spotguard snapshot manifest")
        if data.get("version") != VERSION:
            raise StoreError(f"manifest.json has format version {data.get('version')!r}; this spotguard reads {VERSION}")
        try:
            engine = data.get("engine")
            return cls(
                instance_id=str(data["instance_id"]), event_id=str(data["event_id"]), source=str(data["source"]),
                notice_kind=str(data["notice_kind"]), created_at=str(data["created_at"]),
                completed_at=str(data["completed_at"]), complete=bool(data["complete"]),
                requests=int(data["requests"]),
                objects=tuple(Entry(**{**o, "request_ids": tuple(o.get("request_ids", ()))}) for o in data["objects"]),
                missing=tuple(Missing(**m) for m in data.get("missing", ())),
                encryption={str(k): str(v) for k, v in (data.get("encryption") or {}).items()},
                server_side_encryption=str(data.get("server_side_encryption", "")),
                engine=EngineState(**engine) if isinstance(engine, dict) else None,
                timings={str(k): float(v) for k, v in (data.get("timings") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"manifest.json: missing or bad field ({exc})") from None

    def entry(self, name: str) -> Entry:
        for item in self.objects:
            if item.name == name:
                return item
        raise StoreError(f"manifest lists no object {name!r}")
