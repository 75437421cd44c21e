"""Saving in-flight context to the store within a deadline: the storage half of the snapshot drain step.

The drain step (``drain/snapshot.py``) reads the gate's journal and the engine's busy slots and hands
them over; ``Snapshotter.save`` stores, in this order, so that what matters most lands first when time
runs short:

1. continuation records (request body + output so far) for every in-flight request (``records.py``);
2. llama.cpp KV slot files, most compute saved per byte first (``kv.py``), each streamed from disk in
   bounded multipart parts (``upload.py``), so memory stays flat whatever the size of the files;
3. manifest.json, last, in a slice of the time kept for it. It lists only objects whose upload
   finished, and says what is missing and why. No manifest = incomplete snapshot.

An unreachable or stalled store ends the save on time with a manifest attempt; the result says what
was stored and the step decides what that means for the drain.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import structlog

from spotguard.config import Config
from spotguard.errors import SpotguardError, StoreError
from spotguard.metrics import Metrics
from spotguard.notice import Notice, rfc3339, utcnow
from spotguard.servers.llamacpp import SavedSlot, SlotApi
from spotguard.storage import crypto, model_hash
from spotguard.storage.format import MANIFEST, Manifest, Missing, safe_segment
from spotguard.storage.job import Job
from spotguard.storage.kv import engine_state, save_slots, upload_slots
from spotguard.storage.records import InflightEntry, batches, upload_records
from spotguard.storage.store import MissingObject, Store, StoreOptions, open_store

EARLIER_MANIFEST_TIMEOUT = 1.0
"""Most seconds spent looking for an earlier attempt's manifest (less when the save's time is shorter)."""


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


@dataclass(frozen=True, kw_only=True)
class Inflight:
    """What the drain step read before handing over: it owns the gate's journal and the engine's slot list."""

    requests: Sequence[InflightEntry] = ()
    """The requests in flight with their output so far, as the step cut them (whatever the engine)."""
    count: int = 0
    """Requests in flight, for the manifest: ``len(requests)``, or the count read before the read was cut."""
    busy_slots: Sequence[int] = ()
    """llama.cpp slots that were busy before the requests were cut."""
    problems: Sequence[str] = ()
    """What went wrong reading them (already logged and counted): the snapshot is then incomplete."""


@dataclass(frozen=True, kw_only=True)
class SnapshotResult:
    where: str
    """``<store url>/<instance>/<event>/``."""
    requests: int
    stored_request_ids: frozenset[str]
    """Requests whose record was stored."""
    kv_slots: int
    missing: int
    """Objects the manifest lists as missing."""
    errors: tuple[str, ...] = ()
    manifest_error: str = ""
    """Why the manifest was not stored ("" when it was)."""
    kept_earlier: bool = False
    """Nothing was in flight and an earlier attempt's manifest was left in place."""

    @property
    def complete(self) -> bool:
        return not self.missing and not self.errors and not self.manifest_error


def manifest_reserve(budget: float) -> float:
    """The manifest's slice of a snapshot's ``budget``: enough for one small put, never more than half."""
    return min(max(0.5, budget * 0.15), 3.0, budget / 2)


class Snapshotter:
    """The snapshot store as the drain uses it (``Services.snapshot``), built at startup by ``prepare``.

    ``stamp_model`` (a background task) works out the model's digest when it was not cached; a snapshot
    taken before it is known stamps KV files with an empty digest, which ``resume`` reports as unverified.
    """

    def __init__(self, prepared: Prepared, config: Config) -> None:
        self.prepared = prepared
        self._config = config

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

    async def save(self, inflight: Inflight, *, kv: SlotApi | None, notice: Notice, instance: str, deadline: float,
                   log: structlog.stdlib.BoundLogger, metrics: Metrics) -> SnapshotResult:
        """Store ``inflight`` under ``<url>/<instance>/<event id>/`` before ``deadline`` (``anyio.current_time()``
        clock), KV slot files too when ``kv`` is given. StoreError only when there is no time at all."""
        prepared = self.prepared
        budget = deadline - anyio.current_time()
        if budget <= 0:
            raise StoreError("no time left for a snapshot")
        started = time.monotonic()
        created = rfc3339(utcnow())
        job = Job(store=prepared.store, key=prepared.key, instance=instance, event_id=notice.event_id, log=log,
                  prefix=f"{safe_segment(instance)}/{safe_segment(notice.event_id)}", metrics=metrics)
        progress = job.progress
        progress.errors.extend(inflight.problems)
        reserve = manifest_reserve(budget)
        with anyio.move_on_after(budget - reserve) as scope:
            await self._work(job, inflight, kv, budget - reserve)
        if scope.cancelled_caught:
            progress.errors.append(f"snapshot budget of {budget:.1f}s ran out")
        progress.missing.extend(Missing(what=f"{name}: {what}", reason="failed" if not scope.cancelled_caught
                                        else "budget ran out") for name, what in sorted(progress.pending.items()))
        progress.timings["work_s"] = round(time.monotonic() - started, 4)
        snap = self._config.snapshot
        manifest = Manifest(
            instance_id=instance, event_id=notice.event_id, source=notice.source, notice_kind=notice.kind,
            created_at=created, completed_at=rfc3339(utcnow()), complete=not progress.missing and not progress.errors,
            requests=inflight.count, objects=tuple(sorted(progress.entries, key=lambda e: e.name)),
            missing=tuple(progress.missing), encryption=prepared.key.describe() if prepared.key else {},
            server_side_encryption=snap.server_side_encryption, engine=progress.engine,
            timings={**progress.timings, "budget_s": round(budget, 3)},
        )
        where = f"{prepared.store.url}/{job.prefix}/"
        stored = frozenset(i for e in progress.entries if e.kind == "records" for i in e.request_ids)
        result = SnapshotResult(where=where, requests=inflight.count, stored_request_ids=stored,
                                kv_slots=sum(1 for e in progress.entries if e.kind == "kv"),
                                missing=len(progress.missing), errors=tuple(progress.errors))
        if not inflight.count and not progress.entries and await _earlier_manifest(
                prepared.store, job.prefix, deadline - anyio.current_time() - reserve):
            # A drain resumed after a crash runs the step again once the requests are gone: an empty manifest
            # must not replace the one that lists what was saved the first time.
            log.info("snapshot.kept_earlier", where=where)
            return dataclasses.replace(result, kept_earlier=True)
        manifest_error = await _put_manifest(job, manifest, max(0.05, budget - (time.monotonic() - started)))
        result = dataclasses.replace(result, manifest_error=manifest_error)
        log.info("snapshot.done", where=where, complete=result.complete, records=len(stored),
                 requests=inflight.count, kv_slots=result.kv_slots, missing=result.missing,
                 seconds=round(time.monotonic() - started, 3))
        return result

    async def _work(self, job: Job, inflight: Inflight, kv: SlotApi | None, work_budget: float) -> None:
        requests = inflight.requests
        owners = {r.slot_id: r.id for r in requests if r.slot_id is not None}
        busy = list(inflight.busy_slots)
        if len(requests) == 1 and len(busy) == 1 and not owners:
            owners = {busy[0]: requests[0].id}
        slot_ids = sorted(set(busy) | set(owners))
        snap = self._config.snapshot
        saved: list[SavedSlot] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(upload_records, job, batches(requests), name="snapshot-records")
            if kv is not None:
                job.progress.engine = await engine_state(job, kv, model_sha256=self.prepared.model_sha256,
                                                         kv_cache_types=snap.kv_cache_types)
                if slot_ids and not snap.slot_save_path:
                    job.progress.missing.append(Missing(what="kv slots", reason="[snapshot] slot_save_path is not set"))
                elif slot_ids:
                    saved = await save_slots(job, kv, slot_ids, max(0.5, work_budget * 0.5))
        if saved and job.progress.engine is not None:
            await upload_slots(job, snap.slot_save_path, saved, owners, job.progress.engine)


async def prepare(config: Config) -> Snapshotter:
    return Snapshotter(await anyio.to_thread.run_sync(prepare_blocking, config), config)


async def _put_manifest(job: Job, manifest: Manifest, seconds: float) -> str:
    """Store the manifest within ``seconds``; returns why it was not stored ("" when it was)."""
    error = ""
    with anyio.move_on_after(seconds) as scope:
        try:
            await job.store.put(f"{job.prefix}/{MANIFEST}", manifest.to_json(job.key))
            job.metrics.snapshot_objects.labels(kind="manifest", result="ok").inc()
        except SpotguardError as exc:
            error = str(exc)
    if scope.cancelled_caught:
        error = f"manifest not stored within {seconds:.2f}s"
    if error:
        job.metrics.snapshot_objects.labels(kind="manifest", result="failed").inc()
    return error


async def _earlier_manifest(store: Store, prefix: str, seconds: float) -> bool:
    """Is there already a manifest for this event (a write that did not make it into the drain's state)?
    Looks for at most ``seconds`` (the time left less the manifest's own slice); not found in time = no."""
    seconds = min(EARLIER_MANIFEST_TIMEOUT, seconds)
    if seconds <= 0:
        return False
    try:
        with anyio.fail_after(seconds):
            await store.get(f"{prefix}/{MANIFEST}")
    except (MissingObject, TimeoutError):
        return False
    except StoreError:
        return False  # unreadable: write ours, as before this check existed
    return True
