"""Snapshot benchmark (one command, about 4 minutes): .venv/bin/python bench/snapshot.py

1. Upload throughput of spotguard's object path (sha256 of the stored bytes + obstore multipart put)
   vs a raw ``obstore.put_async`` of the same bytes, in the same run, to moto S3 and to local files.
   Target: ratio >= 0.9.
2. Time to commit continuation records for 1,000 in-flight requests to moto S3 through
   ``take_snapshot`` (records phase, and the whole step including the manifest). Target: <= 1 s.
3. Peak RSS of the snapshot step uploading one big KV slot file (default 2 GiB; ``--kv-mb``), each run
   in its own process (bench/_kv_step.py), to local files and to moto S3, plain and encrypted.
   Target: peak RSS < 300 MB. ``--kv-only`` runs just this part.

Prints medians; ``--json`` prints them as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import anyio
import boto3
import httpx
import obstore
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import start_moto  # noqa: E402
from spotguard.clouds.identity import Identity
from spotguard.config import Config
from spotguard.drain.snapshot import take_snapshot
from spotguard.drain.step import DrainContext
from spotguard.gate.journal import EntryJournal
from spotguard.gate.protocol import JournalEntry
from spotguard.metrics import Metrics
from spotguard.notice import Notice, utcnow
from spotguard.servers.none import NoEngine
from spotguard.services import Services
from spotguard.storage.format import Manifest
from spotguard.storage.snapshot import prepare
from spotguard.storage.store import Store, StoreOptions, open_store
from spotguard.storage.upload import seal_and_put


async def throughput(store: Store, data: bytes, reps: int) -> dict[str, float]:
    """MB/s of spotguard's path and of a raw obstore put, alternating so both see the same load."""
    ours: list[float] = []
    raw: list[float] = []

    async def run_ours(rep: int) -> None:
        started = time.perf_counter()
        await seal_and_put(store, None, f"bench/ours-{rep}", b"", data)
        ours.append(time.perf_counter() - started)

    async def run_raw(rep: int) -> None:
        started = time.perf_counter()
        await obstore.put_async(store.inner, f"bench/raw-{rep}", data)
        raw.append(time.perf_counter() - started)

    await run_ours(-1)  # warm-up: connection pool, page cache, thread pool
    await run_raw(-1)
    ours.clear()
    raw.clear()
    for rep in range(reps):
        # Alternate who goes first: the second writer of a pair shares the disk with the first's writeback.
        first, second = (run_ours, run_raw) if rep % 2 == 0 else (run_raw, run_ours)
        await first(rep)
        await second(rep)
    mb = len(data) / 1e6
    return {"ours_mb_s": round(mb / statistics.median(ours), 1), "raw_mb_s": round(mb / statistics.median(raw), 1),
            "ratio": round(statistics.median(raw) / statistics.median(ours), 3)}


def journal_of(count: int) -> EntryJournal:
    journal = EntryJournal()
    for n in range(count):
        body = json.dumps({"model": "m", "stream": True, "max_tokens": 512,
                           "messages": [{"role": "user", "content": f"question {n} " + "lorem ipsum " * 60}]})
        journal.add(JournalEntry(id=f"req-{len(journal) + 1:08d}", endpoint="/v1/chat/completions", model="m",
                                 body=body.encode(), stream=True, output="partial answer " * 20))
    return journal


async def records_commit(moto_url: str, bucket: str, reps: int) -> dict[str, float]:
    config = Config().replace("snapshot", url=f"s3://{bucket}/records", endpoint_url=moto_url)
    snapshotter = await prepare(config)
    records_s: list[float] = []
    step_s: list[float] = []
    async with httpx.AsyncClient() as http:
        for rep in range(reps):
            journal = journal_of(1000)
            now = utcnow()
            notice = Notice(source="manual", kind="bench", event_id=f"bench-{rep}",
                            deadline=now + timedelta(seconds=60), detected_at=now)
            ctx = DrainContext(config=config, notice=notice, deadline=notice.deadline, dry_run=False,
                               metrics=Metrics(), log=structlog.get_logger("bench"), http=http,
                               services=Services(identity=Identity(cloud="bench", instance_id="i-bench"),
                                                 engine=NoEngine(), journal=journal))
            started = time.perf_counter()
            await take_snapshot(ctx, snapshotter)
            step_s.append(time.perf_counter() - started)
            manifest = Manifest.from_json(await snapshotter.prepared.store.get(f"i-bench/bench-{rep}/manifest.json"))
            records_s.append(manifest.timings["records_s"])
    return {"records_s_median": round(statistics.median(records_s), 3),
            "step_s_median": round(statistics.median(step_s), 3)}


def make_slot_file(path: Path, size_mb: int) -> None:
    """Random bytes (a KV cache does not compress), written once and reused."""
    if path.exists() and path.stat().st_size == size_mb * 2**20:
        return
    with open(path, "wb") as out:
        for _ in range(size_mb // 8):
            out.write(os.urandom(8 * 2**20))


async def raw_upload(store: Store, source: Path) -> None:
    await obstore.put_async(store.inner, "raw/slot.bin", source, chunk_size=8 << 20, max_concurrency=8)


def kv_peak_rss(moto_url: str, bucket: str, size_mb: int, work: Path) -> dict[str, object]:
    """Peak RSS of the snapshot step uploading a ``size_mb`` slot file, per store and with/without a key."""
    master = work / "master-slot.bin"
    make_slot_file(master, size_mb)
    key_file = work / "key"
    key_file.write_bytes(os.urandom(32))
    slots = work / "slots"
    slots.mkdir(exist_ok=True)
    results: dict[str, object] = {}
    for store, url, endpoint in (("local_files", f"file://{work}/store", ""),
                                 ("moto_s3", f"s3://{bucket}/kv", moto_url)):
        for mode, key in (("plain", ""), ("encrypted", str(key_file))):
            child = subprocess.run([sys.executable, str(Path(__file__).with_name("_kv_step.py")), url, endpoint, key,
                                    str(master), str(slots)], capture_output=True, text=True, timeout=900,
                                   check=False)
            if child.returncode != 0:
                raise RuntimeError(f"kv step ({store}, {mode}) exited {child.returncode}: {child.stderr[-2000:]}")
            results[f"{store}_{mode}"] = json.loads(child.stdout.strip().splitlines()[-1])
            if store == "local_files":
                subprocess.run(["rm", "-rf", f"{work}/store"], check=True)
        # Reference: obstore uploading the same file by itself (its own reader, 8 MiB parts, 8 in flight).
        raw = open_store(url, StoreOptions(endpoint_url=endpoint) if endpoint else None)
        started = time.perf_counter()
        anyio.run(raw_upload, raw, master)
        results[f"{store}_raw_obstore_mb_s"] = round(master.stat().st_size / 1e6 / (time.perf_counter() - started), 1)
        if store == "local_files":
            subprocess.run(["rm", "-rf", f"{work}/store"], check=True)
    return results


async def main(size_mb: int, reps: int, kv_mb: int, kv_only: bool) -> dict[str, object]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # keep the output to results
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc, moto_url = start_moto()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket=bucket)
        results: dict[str, object] = {"object_mb": size_mb, "reps": reps}
        if kv_mb:
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
                results["kv_step_peak_rss"] = await anyio.to_thread.run_sync(kv_peak_rss, moto_url, bucket, kv_mb,
                                                                             Path(tmp))
        if kv_only:
            return results
        data = os.urandom(size_mb * 1024 * 1024)
        results["moto_s3"] = await throughput(open_store(f"s3://{bucket}/t", StoreOptions(endpoint_url=moto_url)),
                                              data, reps)
        with tempfile.TemporaryDirectory() as tmp:
            results["local_files"] = await throughput(open_store(f"file://{tmp}/t"), data, reps)
        results["records_1000_moto"] = await records_commit(moto_url, bucket, reps)
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64, help="object size for the throughput runs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--kv-mb", type=int, default=2048, help="slot file size for the peak-RSS run (0 = skip)")
    parser.add_argument("--kv-only", action="store_true", help="only the KV peak-RSS run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = anyio.run(main, args.size_mb, args.reps, args.kv_mb, args.kv_only)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:20} {value}")
