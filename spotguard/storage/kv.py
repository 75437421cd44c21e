"""llama.cpp KV slot files: saved by the engine, uploaded most compute saved per byte first.

llama-server writes each slot to its ``--slot-save-path`` (``POST /slots/{id}?action=save``); each file
is streamed from there to the store with its metadata beside it, then deleted: a leftover slot file is
disk the next VM never sees.
"""

from __future__ import annotations

import json
import time

import anyio

from spotguard.errors import EngineError, StoreError
from spotguard.servers.llamacpp import Props, SavedSlot, SlotApi, slot_file
from spotguard.storage.format import KV_DIR, EngineState, Missing, safe_segment
from spotguard.storage.job import Job

KV_UPLOADS = 4
"""KV files uploaded side by side."""
PROPS_TIMEOUT = 1.0


async def save_slots(job: Job, kv: SlotApi, slot_ids: list[int], time_for_saves: float) -> list[SavedSlot]:
    """Ask llama-server to write each slot to its --slot-save-path; slots still busy after the time are skipped."""
    saved: list[SavedSlot] = []
    started = time.monotonic()
    tag = safe_segment(job.event_id)[:40]

    async def one(slot_id: int) -> None:
        try:
            saved.append(await kv.save(slot_id, f"spotguard-{tag}-slot{slot_id}.bin", timeout=time_for_saves))
        except EngineError as exc:
            job.progress.missing.append(Missing(what=f"kv slot {slot_id}", reason=f"save failed: {exc}"))
            job.metrics.config_errors.labels(component="snapshot", reason="engine").inc()

    with anyio.move_on_after(time_for_saves) as scope:
        async with anyio.create_task_group() as tg:
            for slot_id in slot_ids:
                tg.start_soon(one, slot_id, name=f"kv-save-slot{slot_id}")
    if scope.cancelled_caught:
        done = {s.slot_id for s in saved}
        job.progress.missing.extend(Missing(what=f"kv slot {s}", reason="slot still busy when the save time ran out")
                                    for s in slot_ids if s not in done)
    job.progress.timings["kv_save_s"] = round(time.monotonic() - started, 4)
    return saved


def order_by_value(saved: list[SavedSlot]) -> list[SavedSlot]:
    """Most compute saved per byte first (tokens / bytes), then smaller first: when time runs out, what is
    left behind is the cheapest to redo."""
    return sorted(saved, key=lambda s: (-(s.tokens / max(s.bytes, 1)), s.bytes))


async def upload_slots(job: Job, directory: str, saved: list[SavedSlot], owners: dict[int, str],
                       engine: EngineState) -> None:
    started = time.monotonic()
    ordered = order_by_value(saved)
    for slot in ordered:
        job.progress.pending[f"{KV_DIR}/slot-{slot.slot_id}.bin"] = f"kv slot {slot.slot_id} ({slot.tokens} tokens)"
    limiter = anyio.CapacityLimiter(KV_UPLOADS)

    async def one(slot: SavedSlot) -> None:
        path = slot_file(directory, slot.filename)
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
                job.metrics.config_errors.labels(component="snapshot", reason="store").inc()
            finally:
                # The engine's copy is ours to clean up; a leftover slot file is disk the next VM never sees.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))

    async with anyio.create_task_group() as tg:
        for slot in ordered:
            tg.start_soon(one, slot, name=f"kv-upload-slot{slot.slot_id}")
    job.progress.timings["kv_upload_s"] = round(time.monotonic() - started, 4)


async def engine_state(job: Job, kv: SlotApi, *, model_sha256: str, kv_cache_types: str) -> EngineState:
    """What a KV file needs to be restored safely elsewhere: the model, context size, slots and cache types."""
    try:
        props = await kv.props(timeout=PROPS_TIMEOUT)
    except EngineError as exc:
        job.problem("engine", f"engine props: {exc}")
        props = Props(0, 0, "", "")
    return EngineState(kind="llamacpp", model_sha256=model_sha256, model_path=props.model_path,
                       n_ctx=props.n_ctx, total_slots=props.total_slots,
                       kv_cache_types=kv_cache_types, build_info=props.build_info)
