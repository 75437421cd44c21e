"""The snapshot drain step's work: save in-flight context to the store within the step's budget.

Order, so that what matters most lands first when time runs short:

1. continuation records (request body + output so far) for every in-flight request: small, one
   batch object per few MiB, uploaded in parallel;
2. llama.cpp KV slot files, most compute saved per byte first (tokens / bytes), in parallel, each
   streamed from disk in bounded multipart parts (and sealed frame by frame when encrypted), so memory
   stays flat whatever the size of the files;
3. manifest.json, last, in a slice of the budget kept for it. It lists only objects whose upload
   finished, and says what is missing and why. No manifest = incomplete snapshot.

An unreachable or stalled store ends the step on time with a clear ``StoreError`` after a manifest
attempt; the drain goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import anyio
import structlog

from spotguard.drain.step import step_time_left
from spotguard.errors import EngineError, GateError, SpotguardError, StoreError
from spotguard.notice import rfc3339, utcnow
from spotguard.storage import crypto, llamacpp, model_hash
from spotguard.storage.format import (
    KV_DIR,
    MANIFEST,
    RECORDS_DIR,
    ContinuationRecord,
    EngineState,
    Entry,
    Manifest,
    Missing,
    safe_segment,
)
from spotguard.storage.store import PART_SIZE, MissingObject, Store, StoreOptions, open_store

if TYPE_CHECKING:
    from spotguard.config import Config
    from spotguard.drain.step import DrainContext
    from spotguard.gate.protocol import JournalEntry

RECORD_BATCH_BYTES = 4 * 1024 * 1024
UPLOAD_CONCURRENCY = 8
EARLIER_MANIFEST_TIMEOUT = 1.0
KV_UPLOADS = 4
"""KV files uploaded side by side."""
KV_PART_CONCURRENCY = 4
"""Parts in flight per KV file: KV_UPLOADS x KV_PART_CONCURRENCY x PART_SIZE (128 MiB) bounds the buffers."""
SAFETY = 0.05
"""Seconds kept back from the budget so our own scopes end before the engine's."""


@dataclass(frozen=True)
class Prepared:
    """What is worked out once at startup, not in the drain (hashing a model file takes seconds)."""

    store: Store
    key: crypto.Key | None
    model_sha256: str


def prepare_blocking(config: Config) -> Prepared:
    """Open the store and load the key; the model's digest only when it is cached (see ``model_hash``).
    Raises ConfigError / StoreError. Blocking."""
    snap = config.snapshot
    store = open_store(snap.url, StoreOptions.from_config(snap))
    key = crypto.load_key(snap.encryption_key_file) if snap.encryption_key_file else None
    model_sha = ""
    if config.server.kind == "llamacpp" and snap.model_path:
        if not os.access(snap.model_path, os.R_OK):
            raise StoreError(f"[snapshot] model_path {snap.model_path!r} cannot be read")
        model_sha = model_hash.cached_sha256(snap.model_path, config.agent.state_dir)
    return Prepared(store, key, model_sha)


class Snapshotter:
    """The ``Services.snapshot`` callable, built at startup by ``prepare``.

    ``stamp_model`` (a background task) works out the model's digest when it was not cached; a snapshot
    taken before it is known stamps KV files with an empty digest, which ``resume`` reports as unverified.
    """

    def __init__(self, prepared: Prepared, config: Config) -> None:
        self.prepared = prepared
        self._config = config

    async def __call__(self, ctx: DrainContext) -> str:
        return await take_snapshot(ctx, self.prepared)

    async def stamp_model(self, log: structlog.stdlib.BoundLogger) -> None:
        path = self._config.snapshot.model_path
        if self.prepared.model_sha256 or self._config.server.kind != "llamacpp" or not path:
            return
        started = time.monotonic()
        try:
            digest = await anyio.to_thread.run_sync(model_hash.compute_and_cache, path,
                                                    self._config.agent.state_dir, abandon_on_cancel=True)
        except OSError as exc:
            log.error("model_hash_failed", path=path, error=str(exc))
            return
        self.prepared = dataclasses.replace(self.prepared, model_sha256=digest)
        log.info("model_hashed", path=path, seconds=round(time.monotonic() - started, 3))


async def prepare(config: Config) -> Snapshotter:
    return Snapshotter(await anyio.to_thread.run_sync(prepare_blocking, config), config)


@dataclass
class _Progress:
    """What one snapshot has written so far (local to one call)."""

    entries: list[Entry] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    """Objects planned and not yet stored: name -> what it is (for the manifest's missing list)."""
    requests: int = 0
    engine: EngineState | None = None
    interrupted: list[str] = field(default_factory=list)
    """Requests we cut: the gate leaves them in the journal for us to remove once their records are stored."""


@dataclass(frozen=True)
class _Job:
    ctx: DrainContext
    prepared: Prepared
    prefix: str
    progress: _Progress
    instance: str
    """The instance id as written in the manifest: encrypted objects are bound to it and the event id."""

    def problem(self, reason: str, message: str) -> None:
        """Record, log and count a problem; messages name objects and endpoints, never user data."""
        self.progress.errors.append(message)
        self.ctx.metrics.config_errors.labels(component="snapshot", reason=reason).inc()
        self.ctx.log.warning("snapshot.problem", reason=reason, error=message)

    async def store_object(self, name: str, kind: str, plain: bytes | Path, **extra: object) -> None:
        """Store ``plain`` (bytes, or a file streamed from disk) as ``name`` and list it for the manifest."""
        key = self.prepared.key
        path = f"{self.prefix}/{name}"
        bound = crypto.binding(self.instance, self.ctx.notice.event_id, name)
        try:
            if isinstance(plain, Path):
                size, digest = await put_file(self.prepared.store, key, path, bound, plain)
            else:
                size, digest = await seal_and_put(self.prepared.store, key, path, bound, plain)
        except StoreError:
            self.ctx.metrics.snapshot_objects.labels(kind=kind, result="failed").inc()
            raise
        self.ctx.metrics.snapshot_objects.labels(kind=kind, result="ok").inc()
        self.ctx.metrics.snapshot_bytes.labels(kind=kind).inc(size)
        self.progress.pending.pop(name, None)
        self.progress.entries.append(Entry(name=name, kind=kind, size=size, sha256=digest,
                                           encrypted=key is not None, **extra))  # type: ignore[arg-type]


SMALL = 256 * 1024
"""Below this, hashing and sealing inline is cheaper than a worker thread."""


async def seal_and_put(store: Store, key: crypto.Key | None, path: str, bound_to: bytes,
                       plain: bytes) -> tuple[int, str]:
    """Encrypt (if a key is set; ``bound_to`` from ``crypto.binding``), upload, and hash the stored bytes;
    returns (size, sha256). For objects already in memory (records, metadata); files go through ``put_file``.

    For big objects the hash runs in a worker thread while the upload is in flight (both release
    the GIL), so integrity costs no upload time.
    """
    if len(plain) < SMALL:
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
        tg.start_soon(digest)
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
    handle = await anyio.to_thread.run_sync(open, source, "rb")
    reader = _FileParts(handle, crypto.Sealer(key, bound_to) if key else None)

    async def parts() -> AsyncIterator[bytes]:
        while (part := await anyio.to_thread.run_sync(reader.next_part, abandon_on_cancel=True)) is not None:
            yield part

    try:
        await store.put_stream(path, parts(), concurrency=concurrency)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(handle.close)
    return reader.size, reader.digest.hexdigest()


def _records(requests: list[JournalEntry]) -> list[tuple[list[str], bytes]]:
    """Records as JSON Lines batches of at most RECORD_BATCH_BYTES (one record may exceed it alone)."""
    now = rfc3339(utcnow())
    batches: list[tuple[list[str], bytes]] = []
    ids: list[str] = []
    lines: list[bytes] = []
    size = 0
    for request in requests:
        body, encoding = ContinuationRecord.encode_body(request.body)
        line = ContinuationRecord(
            id=request.id, endpoint=request.endpoint, model=request.model, stream=request.stream, body=body,
            body_encoding=encoding, output=request.output, started_at=rfc3339(request.started_at),
            captured_at=now, finish_reason=request.finish_reason, slot_id=request.slot_id,
            migrated_to=request.migrated_to,
        ).to_json().encode() + b"\n"
        if lines and size + len(line) > RECORD_BATCH_BYTES:
            batches.append((ids, b"".join(lines)))
            ids, lines, size = [], [], 0
        ids.append(request.id)
        lines.append(line)
        size += len(line)
    if lines:
        batches.append((ids, b"".join(lines)))
    return batches


async def _upload_records(job: _Job, batches: list[tuple[list[str], bytes]]) -> None:
    started = time.monotonic()
    limiter = anyio.CapacityLimiter(UPLOAD_CONCURRENCY)

    async def one(index: int, ids: list[str], data: bytes) -> None:
        async with limiter:
            try:
                await job.store_object(f"{RECORDS_DIR}/{index:06d}.jsonl", "records", data, request_ids=tuple(ids))
            except StoreError as exc:
                job.problem("store", f"records: {exc}")

    async with anyio.create_task_group() as tg:
        for index, (ids, data) in enumerate(batches):
            job.progress.pending[f"{RECORDS_DIR}/{index:06d}.jsonl"] = f"records of {len(ids)} requests"
            tg.start_soon(one, index, ids, data)
    job.progress.timings["records_s"] = round(time.monotonic() - started, 4)


async def _save_slots(job: _Job, slot_ids: list[int], time_for_saves: float) -> list[llamacpp.SavedSlot]:
    """Ask llama-server to write each slot to its --slot-save-path; slots still busy after the time are skipped."""
    ctx = job.ctx
    saved: list[llamacpp.SavedSlot] = []
    started = time.monotonic()
    tag = safe_segment(ctx.notice.event_id)[:40]

    async def one(slot_id: int) -> None:
        try:
            saved.append(await llamacpp.save(ctx.http, ctx.config.server.url, slot_id,
                                             f"spotguard-{tag}-slot{slot_id}.bin", timeout=time_for_saves))
        except EngineError as exc:
            job.progress.missing.append(Missing(what=f"kv slot {slot_id}", reason=f"save failed: {exc}"))
            job.ctx.metrics.config_errors.labels(component="snapshot", reason="engine").inc()

    with anyio.move_on_after(time_for_saves) as scope:
        async with anyio.create_task_group() as tg:
            for slot_id in slot_ids:
                tg.start_soon(one, slot_id)
    if scope.cancelled_caught:
        done = {s.slot_id for s in saved}
        job.progress.missing.extend(Missing(what=f"kv slot {s}", reason="slot still busy when the save time ran out")
                                    for s in slot_ids if s not in done)
    job.progress.timings["kv_save_s"] = round(time.monotonic() - started, 4)
    return saved


def order_by_value(saved: list[llamacpp.SavedSlot]) -> list[llamacpp.SavedSlot]:
    """Most compute saved per byte first (tokens / bytes), then smaller first: when time runs out, what is
    left behind is the cheapest to redo."""
    return sorted(saved, key=lambda s: (-(s.tokens / max(s.bytes, 1)), s.bytes))


async def _upload_slots(job: _Job, saved: list[llamacpp.SavedSlot], owners: dict[int, str],
                        engine: EngineState) -> None:
    directory = job.ctx.config.snapshot.slot_save_path
    started = time.monotonic()
    ordered = order_by_value(saved)
    for slot in ordered:
        job.progress.pending[f"{KV_DIR}/slot-{slot.slot_id}.bin"] = f"kv slot {slot.slot_id} ({slot.tokens} tokens)"
    limiter = anyio.CapacityLimiter(KV_UPLOADS)

    async def one(slot: llamacpp.SavedSlot) -> None:
        path = llamacpp.slot_file(directory, slot.filename)
        async with limiter:
            try:
                owner = owners.get(slot.slot_id)
                meta = {"slot_id": slot.slot_id, "request_id": owner, "tokens": slot.tokens, "bytes": slot.bytes,
                        "model_sha256": engine.model_sha256, "n_ctx": engine.n_ctx,
                        "total_slots": engine.total_slots, "kv_cache_types": engine.kv_cache_types}
                name = f"{KV_DIR}/slot-{slot.slot_id}.bin"
                await job.store_object(name, "kv", path, slot_id=slot.slot_id, tokens=slot.tokens,
                                       request_ids=(owner,) if owner else ())
                await job.store_object(f"{KV_DIR}/slot-{slot.slot_id}.json", "kv_meta",
                                       json.dumps(meta, sort_keys=True).encode(), slot_id=slot.slot_id)
            except (StoreError, OSError) as exc:
                job.progress.pending.pop(f"{KV_DIR}/slot-{slot.slot_id}.bin", None)
                job.progress.missing.append(Missing(what=f"kv slot {slot.slot_id}", reason=f"upload failed: {exc}"))
                job.ctx.metrics.config_errors.labels(component="snapshot", reason="store").inc()
            finally:
                # The engine's copy is ours to clean up; a leftover slot file is disk the next VM never sees.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))

    async with anyio.create_task_group() as tg:
        for slot in ordered:
            tg.start_soon(one, slot)
    job.progress.timings["kv_upload_s"] = round(time.monotonic() - started, 4)


async def _engine_state(job: _Job) -> EngineState:
    config = job.ctx.config
    try:
        props = await llamacpp.props(job.ctx.http, config.server.url, timeout=1.0)
    except EngineError as exc:
        job.problem("engine", f"engine props: {exc}")
        props = llamacpp.Props(0, 0, "", "")
    return EngineState(kind="llamacpp", model_sha256=job.prepared.model_sha256, model_path=props.model_path,
                       n_ctx=props.n_ctx, total_slots=props.total_slots,
                       kv_cache_types=config.snapshot.kv_cache_types, build_info=props.build_info)


async def _work(job: _Job, work_budget: float) -> None:
    ctx = job.ctx
    config = ctx.config
    journal = ctx.services.journal
    kv = config.server.kind == "llamacpp" and bool(config.server.url)
    busy: list[int] = []
    if kv:
        try:
            busy = [s.id for s in await llamacpp.slots(ctx.http, config.server.url, timeout=1.0) if s.is_processing]
        except EngineError as exc:
            job.problem("engine", f"engine slots: {exc}")
    # llama.cpp: cut the streams first and let the gate settle them (output final, slot free, ~50 ms),
    # so the records and the saved KV hold the same tokens.
    requests: list[JournalEntry] = []
    if journal is not None:
        try:
            requests = (await journal.interrupt_and_wait(min(1.0, work_budget * 0.1)) if kv
                        else await journal.entries())
        except GateError as exc:
            job.problem("gate", f"gate journal: {exc}")
    job.progress.requests = len(requests)
    owners = {r.slot_id: r.id for r in requests if r.slot_id is not None}
    if len(requests) == 1 and len(busy) == 1 and not owners:
        owners = {busy[0]: requests[0].id}
    slot_ids = sorted(set(busy) | set(owners))
    batches = _records(requests)
    if kv and journal is not None:
        job.progress.interrupted = [r.id for r in requests]
    saved: list[llamacpp.SavedSlot] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_upload_records, job, batches)
        if kv:
            job.progress.engine = await _engine_state(job)
            if slot_ids and not config.snapshot.slot_save_path:
                job.progress.missing.append(Missing(what="kv slots", reason="[snapshot] slot_save_path is not set"))
            elif slot_ids:
                saved = await _save_slots(job, slot_ids, max(0.5, work_budget * 0.5))
    if saved and job.progress.engine is not None:
        await _upload_slots(job, saved, owners, job.progress.engine)


async def _earlier_manifest(store: Store, prefix: str) -> bool:
    """Is there already a manifest for this event (a write that did not make it into the drain's state)?"""
    try:
        with anyio.fail_after(EARLIER_MANIFEST_TIMEOUT):
            await store.get(f"{prefix}/{MANIFEST}")
    except (MissingObject, TimeoutError):
        return False
    except StoreError:
        return False  # unreadable: write ours, as before this check existed
    return True


async def take_snapshot(ctx: DrainContext, prepared: Prepared | None = None) -> str:
    """Save in-flight context under ``<url>/<instance_id>/<event_id>/``; returns a one-line detail.

    Raises ``StoreError`` (after a manifest attempt) when records or the manifest could not be stored.
    """
    config = ctx.config
    budget = min(step_time_left(), ctx.seconds_left(), config.drain.snapshot_budget) - SAFETY
    instance = ctx.services.identity.instance_id or config.agent.instance_id or socket.gethostname()
    prefix = f"{safe_segment(instance)}/{safe_segment(ctx.notice.event_id)}"
    try:
        requests = await ctx.services.journal.count() if ctx.services.journal is not None else 0
    except GateError:
        requests = 0  # _work reports the gate's failure when it reads the journal
    if ctx.dry_run:
        return f"would save {requests} in-flight requests to {config.snapshot.url}/{prefix}/"
    if budget <= 0:
        raise StoreError("no time left for a snapshot")
    if prepared is None:
        prepared = await anyio.to_thread.run_sync(prepare_blocking, config.replace("snapshot", model_path=""))
    started = time.monotonic()
    created = rfc3339(utcnow())
    job = _Job(ctx, prepared, prefix, _Progress(requests=requests), instance)
    # The manifest's slice: enough for one small put, never more than half the budget.
    reserve = min(max(0.5, budget * 0.15), 3.0, budget / 2)
    with anyio.move_on_after(budget - reserve) as scope:
        await _work(job, budget - reserve)
    progress = job.progress
    requests = progress.requests
    if scope.cancelled_caught:
        progress.errors.append(f"snapshot budget of {budget:.1f}s ran out")
    progress.missing.extend(Missing(what=f"{name}: {what}", reason="failed" if not scope.cancelled_caught
                                    else "budget ran out") for name, what in sorted(progress.pending.items()))
    progress.timings["work_s"] = round(time.monotonic() - started, 4)
    complete = not progress.missing and not progress.errors
    manifest = Manifest(
        instance_id=instance, event_id=ctx.notice.event_id, source=ctx.notice.source, notice_kind=ctx.notice.kind,
        created_at=created, completed_at=rfc3339(utcnow()), complete=complete, requests=requests,
        objects=tuple(sorted(progress.entries, key=lambda e: e.name)), missing=tuple(progress.missing),
        encryption=prepared.key.describe() if prepared.key else {},
        server_side_encryption=config.snapshot.server_side_encryption, engine=progress.engine,
        timings={**progress.timings, "budget_s": round(budget, 3)},
    )
    where = f"{prepared.store.url}/{prefix}/"
    if not requests and not progress.entries and await _earlier_manifest(prepared.store, prefix):
        # A drain resumed after a crash runs this step again once the requests are gone: an empty manifest
        # must not replace the one that lists what was saved the first time.
        ctx.log.info("snapshot.kept_earlier", where=where)
        return f"{where}: nothing in flight now; kept the manifest an earlier attempt wrote"
    manifest_error = ""
    left = max(0.05, budget - (time.monotonic() - started))
    with anyio.move_on_after(left) as manifest_scope:
        try:
            await prepared.store.put(f"{prefix}/{MANIFEST}", manifest.to_json(prepared.key))
            ctx.metrics.snapshot_objects.labels(kind="manifest", result="ok").inc()
        except SpotguardError as exc:
            manifest_error = str(exc)
    if manifest_scope.cancelled_caught:
        manifest_error = f"manifest not stored within {left:.2f}s"
    if manifest_error:
        ctx.metrics.snapshot_objects.labels(kind="manifest", result="failed").inc()
    stored_ids = {i for e in progress.entries if e.kind == "records" for i in e.request_ids}
    if ctx.services.journal is not None:
        with contextlib.suppress(GateError):  # a gate that is gone has forgotten them anyway
            await ctx.services.journal.release([i for i in progress.interrupted if i in stored_ids])
    records = len(stored_ids)
    kv = sum(1 for e in progress.entries if e.kind == "kv")
    summary = f"{records}/{requests} records, {kv} kv slots, {len(progress.missing)} missing"
    ctx.log.info("snapshot.done", where=where, complete=complete and not manifest_error, records=records,
                 requests=requests, kv_slots=kv, missing=len(progress.missing),
                 seconds=round(time.monotonic() - started, 3))
    if manifest_error or records < requests:
        problems = "; ".join([*progress.errors, *([manifest_error] if manifest_error else [])])
        raise StoreError(f"snapshot {where} incomplete ({summary}): {problems or 'records not stored'}")
    return f"{where}: {summary}" + ("" if complete else f" ({'; '.join(progress.errors) or 'see manifest'})")
