"""Continuation records: every in-flight request's body and output so far, as JSON Lines batches.

Small and first: one batch object per few MiB, uploaded side by side, so the records of every request
are stored before the (much bigger) KV files start.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import anyio

from spotguard.errors import StoreError
from spotguard.notice import rfc3339, utcnow
from spotguard.storage.format import RECORDS_DIR, ContinuationRecord
from spotguard.storage.job import Job

RECORD_BATCH_BYTES = 4 * 1024 * 1024
UPLOAD_CONCURRENCY = 8


class InflightEntry(Protocol):
    """A request in flight as the drain read it (the gate's ``JournalEntry`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def stream(self) -> bool: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def output(self) -> str:
        """The text the client had so far."""
        ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def slot_id(self) -> int | None: ...
    @property
    def migrated_to(self) -> str: ...


def batches(requests: Sequence[InflightEntry]) -> list[tuple[list[str], bytes]]:
    """Records as JSON Lines batches of at most RECORD_BATCH_BYTES (one record may exceed it alone)."""
    now = rfc3339(utcnow())
    found: list[tuple[list[str], bytes]] = []
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
            found.append((ids, b"".join(lines)))
            ids, lines, size = [], [], 0
        ids.append(request.id)
        lines.append(line)
        size += len(line)
    if lines:
        found.append((ids, b"".join(lines)))
    return found


async def upload_records(job: Job, found: list[tuple[list[str], bytes]]) -> None:
    started = time.monotonic()
    limiter = anyio.CapacityLimiter(UPLOAD_CONCURRENCY)

    async def one(index: int, ids: list[str], data: bytes) -> None:
        async with limiter:
            try:
                await job.store_object(f"{RECORDS_DIR}/{index:06d}.jsonl", "records", data, request_ids=tuple(ids))
            except StoreError as exc:
                job.problem("store", f"records: {exc}")

    async with anyio.create_task_group() as tg:
        for index, (ids, data) in enumerate(found):
            job.progress.pending[f"{RECORDS_DIR}/{index:06d}.jsonl"] = f"records of {len(ids)} requests"
            tg.start_soon(one, index, ids, data, name=f"snapshot-records-{index}")
    job.progress.timings["records_s"] = round(time.monotonic() - started, 4)
