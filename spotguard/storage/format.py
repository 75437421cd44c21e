"""The snapshot format (version 2): continuation records, KV slot metadata and the manifest.

Layout under ``<snapshot url>/<instance_id>/<event_id>/``::

    records/000000.jsonl   continuation records, one JSON object per line (written first)
    kv/slot-<n>.bin        llama.cpp slot file (tokens + KV cache), where the engine can export one
    kv/slot-<n>.json       what the slot file needs to be usable: model sha256, n_ctx, slots, KV types
    manifest.json          written LAST; without it the snapshot is incomplete

Everything read back is treated as hostile (any VM of the fleet, or anyone who can write the bucket,
writes these): parsing is strict about types, names go through ``names.check_name``, record
endpoints must be the paths the gate journals, and with a key the manifest must carry a valid MAC.
Version 1 (no MAC, objects bound to their name only) is still read, and reported as unauthenticated.
docs/snapshots.md is the prose reference of these fields.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from spotguard.errors import StoreError
from spotguard.storage import crypto
from spotguard.storage.names import check_name, shown

FORMAT = "spotguard-snapshot"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
RECORDS_DIR = "records"
KV_DIR = "kv"
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest bigger than this is refused unread (a real one is a few KiB per thousand objects)."""
RECORD_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
"""The only endpoints a record may name: the paths the gate journals."""

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RECORD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def safe_segment(text: str) -> str:
    """A path segment that is the same on every store (instance ids and event ids can hold anything)."""
    cleaned = _SAFE.sub("_", text).strip("._") or "unknown"
    return cleaned[:128]


def _str(data: dict[str, Any], key: str, default: str | None = None, limit: int = 4096) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    if len(value) > limit:
        raise ValueError(f"{key} is longer than {limit} characters")
    return value


def _int(data: dict[str, Any], key: str, default: int | None = None, low: int = 0, high: int = 1 << 62) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer in [{low}, {high}]")
    return value


def _opt_int(data: dict[str, Any], key: str, high: int = 1 << 20) -> int | None:
    return None if data.get(key) is None else _int(data, key, high=high)


def _bool(data: dict[str, Any], key: str, default: bool | None = None) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str, limit: int = 1_000_000) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise ValueError(f"{what} must be a list of at most {limit} items")
    return value


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
    migrated_to: str = ""
    """The peer the gate continued it on (the client got its answer from there); "" = not migrated, resume it."""

    @staticmethod
    def encode_body(raw: bytes) -> tuple[str, str]:
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii"), "base64"

    def body_bytes(self) -> bytes:
        if self.body_encoding != "base64":
            return self.body.encode("utf-8")
        try:
            return base64.b64decode(self.body, validate=True)
        except binascii.Error:
            raise StoreError(f"record {self.id}: body is not valid base64") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Any) -> ContinuationRecord:
        """A record from its parsed JSON; StoreError (naming the record where it can) when it is not one."""
        if not isinstance(data, dict):
            raise StoreError("continuation record: expected a JSON object")
        raw_id = data.get("id")
        label = raw_id if isinstance(raw_id, str) and _RECORD_ID.fullmatch(raw_id) else None
        try:
            if label is None:
                raise ValueError(f"id {shown(repr(raw_id), 60)} is not 1-128 of [A-Za-z0-9._:-]")
            endpoint = _str(data, "endpoint")
            if endpoint not in RECORD_ENDPOINTS:
                raise ValueError(f"endpoint {shown(repr(endpoint), 80)} is not one of {', '.join(RECORD_ENDPOINTS)}")
            encoding = _str(data, "body_encoding", "utf-8")
            if encoding not in ("utf-8", "base64"):
                raise ValueError(f"body_encoding {shown(repr(encoding), 40)} is not utf-8 or base64")
            finish = data.get("finish_reason")
            return cls(id=label, endpoint=endpoint, model=_str(data, "model", limit=1024),
                       stream=_bool(data, "stream"), body=_str(data, "body", limit=1 << 30),
                       body_encoding=encoding, output=_str(data, "output", limit=1 << 30),
                       started_at=_str(data, "started_at", limit=64), captured_at=_str(data, "captured_at", limit=64),
                       finish_reason=None if finish is None else _str(data, "finish_reason", limit=64),
                       slot_id=_opt_int(data, "slot_id"),
                       migrated_to=_str(data, "migrated_to", "", limit=2048))
        except (KeyError, TypeError, ValueError) as exc:
            where = f"record {label}" if label else "continuation record"
            raise StoreError(f"{where}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class BadRecord:
    """A line of a records object that is not a usable record, and why (resume reports it, sends nothing)."""

    source: str
    line: int
    id: str
    """The record's id when it had a usable one, else ``<object>:<line>``."""
    error: str


def parse_records(text: str, source: str = "records") -> list[ContinuationRecord | BadRecord]:
    """Every line of a records object, parsed: a record, or a ``BadRecord`` saying what is wrong with it."""
    found: list[ContinuationRecord | BadRecord] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            found.append(BadRecord(source=source, line=number, id=f"{source}:{number}", error="not JSON"))
            continue
        try:
            found.append(ContinuationRecord.from_json(data))
        except StoreError as exc:
            raw_id = data.get("id") if isinstance(data, dict) else None
            label = raw_id if isinstance(raw_id, str) and _RECORD_ID.fullmatch(raw_id) else f"{source}:{number}"
            found.append(BadRecord(source=source, line=number, id=label, error=str(exc)))
    return found


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

    @classmethod
    def from_json(cls, data: Any) -> EngineState:
        data = _object(data, "engine")
        sha = _str(data, "model_sha256", "")
        if sha and not _SHA256.fullmatch(sha):
            raise ValueError("engine.model_sha256 must be 64 lowercase hex characters")
        return cls(kind=_str(data, "kind", limit=32), model_sha256=sha, model_path=_str(data, "model_path", ""),
                   n_ctx=_int(data, "n_ctx", 0, high=1 << 24), total_slots=_int(data, "total_slots", 0, high=4096),
                   kv_cache_types=_str(data, "kv_cache_types", "", limit=64),
                   build_info=_str(data, "build_info", "", limit=256))


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

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        data = _object(data, "object")
        kind = _str(data, "kind", limit=16)
        name = check_name(data.get("name"), kind)
        sha = _str(data, "sha256")
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"{name}: sha256 must be 64 lowercase hex characters")
        ids = _list(data.get("request_ids", []), f"{name}: request_ids")
        if not all(isinstance(i, str) and _RECORD_ID.fullmatch(i) for i in ids):
            raise ValueError(f"{name}: request_ids must be record ids")
        return cls(name=name, kind=kind, size=_int(data, "size"), sha256=sha, encrypted=_bool(data, "encrypted"),
                   request_ids=tuple(ids), slot_id=_opt_int(data, "slot_id"),
                   tokens=_int(data, "tokens", 0, high=1 << 32))


@dataclass(frozen=True, kw_only=True)
class Missing:
    """Something that should be in the snapshot and is not, and why."""

    what: str
    reason: str


@dataclass(frozen=True)
class Trust:
    """What a reader could establish about a manifest."""

    authenticated: bool
    note: str
    """One line for people: why it is, or is not, authenticated."""


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
    authentication: dict[str, str] = field(default_factory=dict)
    """Version 2 with a key: ``algorithm``, ``key_id`` and ``mac`` (HMAC-SHA256 of the canonical rest)."""

    def to_json(self, key: crypto.Key | None = None) -> bytes:
        """The manifest as stored; with ``key`` it carries a MAC over everything else in it."""
        data = asdict(self)
        data.pop("authentication")
        if key is not None:
            data["authentication"] = {"algorithm": crypto.MAC_ALGORITHM, "key_id": key.key_id,
                                      "mac": crypto.manifest_mac(key, canonical(data))}
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse strictly, without checking authentication (``parse_manifest`` does both)."""
        return _manifest(_load(raw))

    def entry(self, name: str) -> Entry:
        for item in self.objects:
            if item.name == name:
                return item
        raise StoreError(f"manifest lists no object {shown(repr(name))}")


def canonical(data: dict[str, Any]) -> bytes:
    """The bytes the manifest MAC covers: sorted keys, no whitespace, ASCII only."""
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode()
    except ValueError:
        raise StoreError("manifest.json holds values JSON cannot represent (NaN, infinity)") from None


def _load(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise StoreError(f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes: refused")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise StoreError("manifest.json is not JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError("manifest.json is not a spotguard snapshot manifest")
    if data.get("version") not in READABLE_VERSIONS or isinstance(data.get("version"), bool):
        raise StoreError(f"manifest.json has format version {shown(repr(data.get('version')), 40)}; this spotguard "
                         f"reads {', '.join(map(str, READABLE_VERSIONS))}")
    return data


def _manifest(data: dict[str, Any]) -> Manifest:
    try:
        objects = tuple(Entry.from_json(o) for o in _list(data["objects"], "objects", 100_000))
        names = [o.name for o in objects]
        if len(set(names)) != len(names):
            raise ValueError("an object is listed twice")
        missing = tuple(Missing(what=_str(m, "what"), reason=_str(m, "reason"))
                        for m in (_object(m, "missing item") for m in _list(data.get("missing", []), "missing")))
        encryption = _object(data.get("encryption") or {}, "encryption")
        authentication = _object(data.get("authentication") or {}, "authentication")
        timings = _object(data.get("timings") or {}, "timings")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in timings.values()):
            raise ValueError("timings must be numbers")
        engine = data.get("engine")
        return Manifest(
            instance_id=_str(data, "instance_id", limit=256), event_id=_str(data, "event_id", limit=256),
            source=_str(data, "source", limit=64), notice_kind=_str(data, "notice_kind", limit=128),
            created_at=_str(data, "created_at", limit=64), completed_at=_str(data, "completed_at", limit=64),
            complete=_bool(data, "complete"), requests=_int(data, "requests", high=1 << 32), objects=objects,
            missing=missing, encryption={str(k): _str(encryption, k, limit=256) for k in encryption},
            server_side_encryption=_str(data, "server_side_encryption", "", limit=64),
            engine=None if engine is None else EngineState.from_json(engine),
            timings={str(k): float(v) for k, v in timings.items()}, version=int(data["version"]),
            authentication={str(k): _str(authentication, k, limit=256) for k in authentication},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"manifest.json: missing or bad field ({shown(str(exc))})") from None


def parse_manifest(raw: bytes, key: crypto.Key | None) -> tuple[Manifest, Trust]:
    """Parse a manifest and check its MAC with ``key``; StoreError when the MAC does not verify.

    Without a key nothing can be verified (``Trust.authenticated`` is False and says so); whether an
    unauthenticated manifest is acceptable is the caller's decision (``reader.open_snapshot``).
    """
    data = _load(raw)
    auth = data.get("authentication")
    manifest = _manifest(data)
    if manifest.version == 1:
        return manifest, Trust(False, "format version 1: manifests were not authenticated")
    if not auth:
        return manifest, Trust(False, "written without an encryption key: the manifest carries no MAC")
    if key is None:
        return manifest, Trust(False, "authenticated by its writer, but not verified: no key given "
                                      "([snapshot] encryption_key_file)")
    wanted = manifest.authentication.get("key_id", "")
    if manifest.authentication.get("algorithm") != crypto.MAC_ALGORITHM:
        raise StoreError(f"manifest.json: unknown authentication algorithm "
                         f"{shown(repr(manifest.authentication.get('algorithm')), 40)}")
    if wanted != key.key_id:
        raise StoreError(f"manifest.json is authenticated with key {shown(wanted, 40)}, the key given is "
                         f"{key.key_id}")
    rest = {k: v for k, v in data.items() if k != "authentication"}
    if not crypto.manifest_mac_ok(key, canonical(rest), manifest.authentication.get("mac", "")):
        raise StoreError("manifest.json does not verify: it was changed after its writer signed it")
    return manifest, Trust(True, f"authenticated (HMAC-SHA256, key {key.key_id})")
