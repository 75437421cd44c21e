"""Public API for tools and routers: list snapshots, read a manifest and its records, verify hashes.

    snaps = await list_snapshots("s3://bucket/spotguard")
    snap = await open_snapshot("s3://bucket/spotguard/i-0abc/evt-1")   # raises IncompleteSnapshot
    for record in await snap.records(): ...
    problems = await snap.verify()                                       # [] when every hash matches

Every object read is checked against the manifest's size and sha256 before it is decrypted or
parsed. A snapshot without manifest.json is incomplete and is never read as if it were whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import anyio

from spotguard.errors import StoreError
from spotguard.storage import crypto
from spotguard.storage.format import MANIFEST, ContinuationRecord, Manifest, parse_records
from spotguard.storage.store import MissingObject, Store, StoreOptions, open_store

__all__ = ["IncompleteSnapshot", "Snapshot", "SnapshotSummary", "list_snapshots", "open_snapshot"]


class IncompleteSnapshot(StoreError):
    """The snapshot has no manifest.json: its writer was cut off before the end."""


@dataclass(frozen=True)
class SnapshotSummary:
    url: str
    instance_id: str
    event_id: str
    has_manifest: bool
    objects: int
    bytes: int


async def list_snapshots(store_url: str, options: StoreOptions | None = None) -> list[SnapshotSummary]:
    """Every ``<instance>/<event>/`` under ``store_url``; those without a manifest are marked so."""
    store = open_store(store_url, options)
    found: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for info in await store.list():
        parts = info.path.split("/")
        if len(parts) >= 3:
            found.setdefault((parts[0], parts[1]), []).append(("/".join(parts[2:]), info.size))
    return [SnapshotSummary(url=f"{store.url}/{instance}/{event}", instance_id=instance, event_id=event,
                            has_manifest=any(name == MANIFEST for name, _ in items), objects=len(items),
                            bytes=sum(size for _, size in items))
            for (instance, event), items in sorted(found.items())]


@dataclass(frozen=True)
class Snapshot:
    url: str
    store: Store
    manifest: Manifest
    key: crypto.Key | None = None

    async def read(self, name: str) -> bytes:
        """The object's plaintext, after checking size and sha256 against the manifest."""
        entry = self.manifest.entry(name)
        stored = await self.store.get(name)
        if len(stored) != entry.size or hashlib.sha256(stored).hexdigest() != entry.sha256:
            raise StoreError(f"{self.url}/{name}: size or sha256 differs from the manifest (corrupt or altered)")
        if not entry.encrypted:
            return stored
        if self.key is None:
            raise StoreError(f"{self.url}/{name} is encrypted: pass the key ([snapshot] encryption_key_file)")
        wanted = self.manifest.encryption.get("key_id", "")
        if wanted and wanted != self.key.key_id:
            raise StoreError(f"{self.url}: encrypted with key {wanted}, the key given is {self.key.key_id}")
        return crypto.decrypt(self.key, name, stored)

    async def records(self) -> list[ContinuationRecord]:
        found: list[ContinuationRecord] = []
        for entry in self.manifest.objects:
            if entry.kind == "records":
                text = (await self.read(entry.name)).decode("utf-8")
                found.extend(parse_records(text))
        return found

    async def verify(self) -> list[str]:
        """Problems found (missing objects, bad hashes); an empty list means every object is intact."""
        problems = [f"missing: {m.what} ({m.reason})" for m in self.manifest.missing]
        for entry in self.manifest.objects:
            try:
                stored = await self.store.get(entry.name)
            except StoreError as exc:
                problems.append(f"{entry.name}: {exc}")
                continue
            if len(stored) != entry.size or hashlib.sha256(stored).hexdigest() != entry.sha256:
                problems.append(f"{entry.name}: size or sha256 differs from the manifest")
        return problems

    async def download(self, directory: str) -> list[Path]:
        """Write every object's plaintext under ``directory`` (snapshots get); returns the files written."""
        written = []
        for entry in self.manifest.objects:
            data = await self.read(entry.name)
            target = Path(directory) / entry.name
            await anyio.to_thread.run_sync(_write, target, data)
            written.append(target)
        return written


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


async def open_snapshot(url: str, options: StoreOptions | None = None, *,
                        key: crypto.Key | None = None) -> Snapshot:
    """Open one snapshot by its URL (``<store url>/<instance>/<event>``); raises IncompleteSnapshot."""
    store = open_store(url, options)
    try:
        raw = await store.get(MANIFEST)
    except MissingObject:
        raise IncompleteSnapshot(f"{url}: no manifest.json; the snapshot is incomplete") from None
    return Snapshot(store.url, store, Manifest.from_json(raw), key)
