"""Moving one object into the store: sealed when a key is set, hashed as stored, streamed when it is a file.

Objects already in memory (records, metadata) go through ``seal_and_put``; files (KV slots, gigabytes)
through ``put_file``, in bounded multipart parts sealed frame by frame, so memory stays flat whatever the
size. Both return (stored size, sha256 of the stored bytes) for the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import anyio

from spotguard.storage import crypto
from spotguard.storage.store import PART_SIZE, Store

KV_PART_CONCURRENCY = 4
"""Parts in flight per file: with ``kv.KV_UPLOADS`` files side by side, x PART_SIZE (128 MiB) bounds the buffers."""


async def seal_and_put(store: Store, key: crypto.Key | None, path: str, bound_to: bytes,
                       plain: bytes) -> tuple[int, str]:
    """Encrypt (if a key is set; ``bound_to`` from ``crypto.binding``), upload, and hash the stored bytes;
    returns (size, sha256). For objects already in memory (records, metadata); files go through ``put_file``.

    For big objects the hash runs in a worker thread while the upload is in flight (both release
    the GIL), so integrity costs no upload time.
    """
    if len(plain) < crypto.OFFLOAD_BYTES:
        stored = crypto.seal(key, bound_to, plain) if key else plain
        await store.put(path, stored)
        return len(stored), hashlib.sha256(stored).hexdigest()
    # abandon_on_cancel: at the budget's end a thread still hashing a big file must not hold the step.
    sealed = (await anyio.to_thread.run_sync(crypto.seal, key, bound_to, plain, abandon_on_cancel=True)
              if key else plain)
    digests: list[str] = []

    async def digest() -> None:
        digests.append(await anyio.to_thread.run_sync(lambda: hashlib.sha256(sealed).hexdigest(),
                                                      abandon_on_cancel=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(digest, name="snapshot-object-sha256")
        await store.put(path, sealed)
    return len(sealed), digests[0]


class _FileParts:
    """Reads a file part by part, sealing it frame by frame when a key is set, hashing what is stored.

    Blocking (file reads, AES, sha256 all release the GIL): ``next_part`` runs in a worker thread.
    """

    def __init__(self, handle: BinaryIO, sealer: crypto.Sealer | None) -> None:
        self._handle = handle
        self._sealer = sealer
        self._frame = sealer.frame_bytes if sealer else PART_SIZE
        self._ahead: bytes | None = None
        self._header = sealer.header if sealer else b""
        self._done = False
        self.digest = hashlib.sha256()
        self.size = 0

    def _read(self) -> bytes:
        chunks = []
        want = self._frame
        while want:
            chunk = self._handle.read(want)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks)

    def next_part(self) -> bytes | None:
        if self._done:
            return None
        out = [self._header]
        self._header = b""
        produced = 0
        while produced < PART_SIZE and not self._done:
            frame = self._read() if self._ahead is None else self._ahead
            # The last frame is sealed as such: look one frame ahead to know.
            self._ahead = self._read() if len(frame) == self._frame else b""
            last = not self._ahead
            piece = self._sealer.seal(frame, last) if self._sealer else frame
            self._done = last
            out.append(piece)
            produced += len(piece)
        part = b"".join(out)
        self.digest.update(part)
        self.size += len(part)
        return part


async def put_file(store: Store, key: crypto.Key | None, path: str, bound_to: bytes, source: Path, *,
                   concurrency: int = KV_PART_CONCURRENCY) -> tuple[int, str]:
    """Stream ``source`` to the store in parts of PART_SIZE (sealed frame by frame with ``key``), hashing the
    stored bytes on the way; returns (size, sha256). Memory: about ``concurrency`` + 1 parts, whatever the size."""
    sealer = crypto.Sealer(key, bound_to) if key else None  # before the file is opened: if it raises, nothing leaks
    handle = await anyio.to_thread.run_sync(open, source, "rb")
    reader = _FileParts(handle, sealer)

    async def parts() -> AsyncIterator[bytes]:
        while (part := await anyio.to_thread.run_sync(reader.next_part, abandon_on_cancel=True)) is not None:
            yield part

    try:
        await store.put_stream(path, parts(), concurrency=concurrency)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(handle.close)
    return reader.size, reader.digest.hexdigest()
