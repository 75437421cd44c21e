"""Public API for tools and routers: list snapshots, read a manifest and its records, verify hashes.

    snaps = await list_snapshots("s3://bucket/spotguard")
    snap = await open_snapshot("s3://bucket/spotguard/i-0abc/evt-1", key=key)  # raises IncompleteSnapshot
    for record in await snap.records(): ...
    problems = await snap.verify()                                       # [] when every hash matches

Everything in the store is treated as hostile (see docs/snapshots.md, "Trust model"):

- the manifest is parsed strictly, every object name in it is checked (relative, normalised, one of
  the names this format writes) before anything is fetched, and with a key its MAC must verify;
- with a key, an unauthenticated manifest (format version 1, or written without a key) is refused
  unless the caller passes ``allow_unauthenticated=True``;
- every object is read as a stream, checked against the manifest's size and sha256, and decrypted
  frame by frame (bound to this snapshot's instance, event and the object's name); nothing is
  returned or published before all of it has been checked;
- downloads go under the destination only (``names.SafeFile``: no symlink is followed).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import anyio

from spotguard.errors import StoreError
from spotguard.storage import crypto
from spotguard.storage.format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    BadRecord,
    ContinuationRecord,
    Entry,
    Manifest,
    Trust,
    parse_manifest,
    parse_records,
    safe_segment,
)
from spotguard.storage.names import SafeFile, shown
from spotguard.storage.store import MissingObject, Store, StoreOptions, open_store

__all__ = ["IncompleteSnapshot", "Snapshot", "SnapshotSummary", "UnauthenticatedSnapshot", "list_snapshots",
           "open_snapshot"]

MAX_INLINE_BYTES = 256 << 20
"""Largest object read into memory (records, slot metadata); KV files are streamed to disk instead."""


class IncompleteSnapshot(StoreError):
    """The snapshot has no manifest.json: its writer was cut off before the end."""


class UnauthenticatedSnapshot(StoreError):
    """A key was given but the manifest carries no MAC (format version 1, or written without a key)."""


@dataclass(frozen=True)
class SnapshotSummary:
    url: str
    instance_id: str
    event_id: str
    has_manifest: bool
    objects: int
    bytes: int
    error: str = ""
    """Why this snapshot could not be listed (e.g. a key the store cannot parse); empty when it could."""


async def list_snapshots(store_url: str, options: StoreOptions | None = None) -> list[SnapshotSummary]:
    """Every ``<instance>/<event>/`` under ``store_url``; those without a manifest are marked so.

    One flat listing normally. Anyone who can write the bucket can plant a key the store client
    refuses to parse (a literal ``..``), which fails a flat listing as a whole: then the store is walked
    level by level, so only the snapshot holding that key is reported as unreadable.
    """
    store = open_store(store_url, options)
    found: dict[tuple[str, str], list[tuple[str, int]]] = {}
    try:
        listing = await store.list()
    except MissingObject:
        raise
    except StoreError:
        return await _walk(store)
    for info in listing:
        parts = info.path.split("/")
        if len(parts) >= 3:
            found.setdefault((parts[0], parts[1]), []).append(("/".join(parts[2:]), info.size))
    return [_summary(store, instance, event, items) for (instance, event), items in sorted(found.items())]


def _summary(store: Store, instance: str, event: str, items: list[tuple[str, int]], error: str = "") -> SnapshotSummary:
    return SnapshotSummary(url=f"{store.url}/{instance}/{event}", instance_id=instance, event_id=event,
                           has_manifest=any(name == MANIFEST for name, _ in items), objects=len(items),
                           bytes=sum(size for _, size in items), error=error)


async def _walk(store: Store) -> list[SnapshotSummary]:
    summaries = []
    for instance_path in sorted(await store.children()):
        instance = instance_path.rstrip("/").rsplit("/", 1)[-1]
        for event_path in sorted(await store.children(instance_path)):
            event = event_path.rstrip("/").rsplit("/", 1)[-1]
            try:
                listing = await store.list(event_path)
            except StoreError as exc:
                summaries.append(_summary(store, instance, event, [], error=str(exc)))
                continue
            items = [(info.path.split("/", 2)[-1], info.size) for info in listing]
            summaries.append(_summary(store, instance, event, items))
    return summaries


class _Check:
    """Hashes and counts stored bytes as they stream in, and decrypts them when the object is sealed."""

    def __init__(self, snapshot: Snapshot, entry: Entry) -> None:
        self._url = snapshot.url
        self._entry = entry
        self._digest = hashlib.sha256()
        self._size = 0
        self._opener: crypto.Opener | None = None
        self._v1: list[bytes] | None = None
        if entry.encrypted:
            key = snapshot.key
            if key is None:
                raise StoreError(f"{self._url}/{entry.name} is encrypted: pass the key "
                                 f"([snapshot] encryption_key_file)")
            wanted = snapshot.manifest.encryption.get("key_id", "")
            if wanted and wanted != key.key_id:
                raise StoreError(f"{self._url}: encrypted with key {shown(wanted, 40)}, the key given is {key.key_id}")
            if snapshot.manifest.version == 1:
                self._v1 = []
            else:
                bound = crypto.binding(snapshot.manifest.instance_id, snapshot.manifest.event_id, entry.name)
                self._opener = crypto.Opener(key, bound, entry.name)
        self._key = snapshot.key

    def feed(self, stored: bytes) -> bytes:
        self._size += len(stored)
        if self._size > self._entry.size:
            raise self.altered()
        self._digest.update(stored)
        if self._opener is not None:
            return self._opener.feed(stored)
        if self._v1 is not None:
            self._v1.append(stored)  # version 1 is one AES-GCM message: it can only be opened whole
            return b""
        return stored

    def finish(self) -> bytes:
        if self._size != self._entry.size or self._digest.hexdigest() != self._entry.sha256:
            raise self.altered()
        if self._opener is not None:
            return self._opener.finish()
        if self._v1 is not None:
            assert self._key is not None
            return crypto.decrypt_v1(self._key, self._entry.name, b"".join(self._v1))
        return b""

    def altered(self) -> StoreError:
        return StoreError(f"{self._url}/{self._entry.name}: size or sha256 differs from the manifest "
                          f"(corrupt or altered)")


@dataclass(frozen=True)
class Snapshot:
    url: str
    store: Store
    manifest: Manifest
    key: crypto.Key | None = None
    trust: Trust = Trust(False, "not checked")

    async def _chunks(self, entry: Entry) -> AsyncGenerator[bytes, None]:
        """The object's plaintext, chunk by chunk; the last chunk only once size and sha256 matched.

        Callers must not publish anything before the iteration ended without an error.
        """
        check = _Check(self, entry)
        if await self.store.size(entry.name) != entry.size:
            raise check.altered()
        async with aclosing(self.store.stream(entry.name, entry.size)) as stream:
            async for stored in stream:
                plain = check.feed(stored)
                if plain:
                    yield plain
        tail = check.finish()
        if tail:
            yield tail

    async def read(self, name: str) -> bytes:
        """The object's plaintext, after checking size and sha256 against the manifest (small objects)."""
        entry = self.manifest.entry(name)
        if entry.size > MAX_INLINE_BYTES:
            raise StoreError(f"{self.url}/{name}: {entry.size} bytes is too large to read into memory; "
                             f"save it to a file instead")
        async with aclosing(self._chunks(entry)) as chunks:
            return b"".join([chunk async for chunk in chunks])

    async def save(self, name: str, root: Path, as_name: str | None = None) -> Path:
        """Stream the object's plaintext to ``root / (as_name or name)``, published only once it checked out."""
        entry = self.manifest.entry(name)
        target = await anyio.to_thread.run_sync(SafeFile, root, as_name or entry.name)
        try:
            async with aclosing(self._chunks(entry)) as chunks:
                async for chunk in chunks:
                    await anyio.to_thread.run_sync(target.write, chunk)
            return await anyio.to_thread.run_sync(target.commit)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(target.discard)

    async def read_records(self) -> list[ContinuationRecord | BadRecord]:
        """Every record line, each parsed or reported as bad (resume sends only the good ones)."""
        found: list[ContinuationRecord | BadRecord] = []
        for entry in self.manifest.objects:
            if entry.kind == "records":
                try:
                    text = (await self.read(entry.name)).decode("utf-8")
                except UnicodeDecodeError:
                    raise StoreError(f"{self.url}/{entry.name}: not UTF-8 text") from None
                found.extend(parse_records(text, entry.name))
        return found

    async def records(self) -> list[ContinuationRecord]:
        """Every record; StoreError naming the first bad one."""
        records = []
        for item in await self.read_records():
            if isinstance(item, BadRecord):
                raise StoreError(f"{self.url}/{item.source} line {item.line}: {item.error}")
            records.append(item)
        return records

    async def verify(self) -> list[str]:
        """Problems found (missing objects, bad hashes); an empty list means every object is intact."""
        problems = [f"missing: {m.what} ({m.reason})" for m in self.manifest.missing]
        for entry in self.manifest.objects:
            digest = hashlib.sha256()
            size = 0
            try:
                if await self.store.size(entry.name) != entry.size:
                    problems.append(f"{entry.name}: size or sha256 differs from the manifest")
                    continue
                async with aclosing(self.store.stream(entry.name, entry.size)) as stream:
                    async for stored in stream:
                        size += len(stored)
                        if size > entry.size:
                            break
                        digest.update(stored)
            except StoreError as exc:
                problems.append(f"{entry.name}: {exc}")
                continue
            if size != entry.size or digest.hexdigest() != entry.sha256:
                problems.append(f"{entry.name}: size or sha256 differs from the manifest")
        return problems

    async def download(self, directory: str) -> list[Path]:
        """Write every object's plaintext under ``directory`` (snapshots get); returns the files written.

        Names were checked when the manifest was opened, so nothing lands outside ``directory``; each
        file appears only once its object checked out.
        """
        return [await self.save(entry.name, Path(directory)) for entry in self.manifest.objects]


async def open_snapshot(url: str, options: StoreOptions | None = None, *, key: crypto.Key | None = None,
                        allow_unauthenticated: bool = False) -> Snapshot:
    """Open one snapshot by its URL (``<store url>/<instance>/<event>``).

    Raises IncompleteSnapshot without a manifest, StoreError when the manifest is malformed, names an
    object outside the snapshot or does not verify with ``key``, and UnauthenticatedSnapshot when a
    key is given, the manifest carries no MAC and ``allow_unauthenticated`` is False.
    """
    store = open_store(url, options)
    try:
        raw = await store.get(MANIFEST, limit=MAX_MANIFEST_BYTES)
    except MissingObject:
        raise IncompleteSnapshot(f"{url}: no manifest.json; the snapshot is incomplete") from None
    manifest, trust = parse_manifest(raw, key)
    if key is not None and not trust.authenticated and not allow_unauthenticated:
        raise UnauthenticatedSnapshot(f"{url}: manifest not authenticated ({trust.note}); anyone who can write "
                                      f"the store could have changed it. Pass --allow-unauthenticated "
                                      f"(allow_unauthenticated=True) to read it anyway")
    if trust.authenticated:
        # The MAC covers instance and event: a signed manifest copied under another snapshot's prefix is
        # refused here, before its objects (bound to the same two values) are even fetched.
        where = store.url.rstrip("/").split("/")
        expected = [safe_segment(manifest.instance_id), safe_segment(manifest.event_id)]
        if where[-2:] != expected:
            raise StoreError(f"{url}: the manifest belongs to {'/'.join(expected)}, not to this location "
                             f"(copied from another snapshot?)")
    return Snapshot(store.url, store, manifest, key, trust)
