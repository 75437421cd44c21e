"""One snapshot step uploading one big llama.cpp slot file, in its own process so its peak RSS is its own.

    python bench/_kv_step.py STORE_URL ENDPOINT_URL KEY_FILE MASTER_SLOT_FILE SLOT_DIR

The engine is a stand-in serving llama.cpp's slot API shapes (``GET /slots``, ``GET /props``,
``POST /slots/0?action=save``) in this process: the tiny test model cannot make a multi-GB slot file,
so "save" hard-links MASTER_SLOT_FILE into SLOT_DIR under the name the step asked for (the step deletes
its copy after the upload). Everything else is spotguard's real snapshot step. Prints one JSON object:
RSS before the step, peak RSS (VmHWM) after it, seconds, and the step's detail line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import anyio
import httpx
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spotguard import asgi  # noqa: E402
from spotguard.clouds.identity import Identity  # noqa: E402
from spotguard.config import Config  # noqa: E402
from spotguard.drain.snapshot import take_snapshot  # noqa: E402
from spotguard.drain.step import DrainContext  # noqa: E402
from spotguard.gate.journal import EntryJournal  # noqa: E402
from spotguard.gate.protocol import JournalEntry  # noqa: E402
from spotguard.metrics import Metrics  # noqa: E402
from spotguard.notice import Notice, utcnow  # noqa: E402
from spotguard.servers.none import NoEngine  # noqa: E402
from spotguard.services import Services  # noqa: E402
from spotguard.storage.snapshot import prepare  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


async def main(store_url: str, endpoint: str, key_file: str, master: Path, slot_dir: Path) -> dict[str, object]:
    size = master.stat().st_size

    async def engine(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            return
        body = await asgi.read_body(receive)
        path = scope["path"]
        if path == "/slots":
            answer: object = [{"id": 0, "is_processing": True, "n_prompt_tokens": 30000, "next_token": []}]
        elif path == "/props":
            answer = {"default_generation_settings": {"n_ctx": 32768}, "total_slots": 1,
                      "model_path": "stand-in.gguf", "build_info": "stand-in"}
        else:
            filename = json.loads(body)["filename"]
            os.link(master, slot_dir / filename)
            answer = {"id_slot": 0, "filename": filename, "n_saved": 30000, "n_written": size}
        await asgi.respond(send, 200, json.dumps(answer), content_type="application/json")

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    async with anyio.create_task_group() as tg:
        bound = await tg.start(asgi.serve_tcp, engine, "127.0.0.1", 0)
        config = (Config()
                  .replace("snapshot", url=store_url, endpoint_url=endpoint, encryption_key_file=key_file,
                           slot_save_path=str(slot_dir))
                  .replace("server", kind="llamacpp", url=bound.url)
                  .replace("drain", snapshot_budget=600.0))
        snapshotter = await prepare(config)
        journal = EntryJournal()
        journal.add(JournalEntry(id="req-1", endpoint="/v1/chat/completions", model="m", stream=True,
                                    body=b'{"messages":[{"role":"user","content":"hi"}]}', slot_id=0))
        now = utcnow()
        notice = Notice(source="manual", kind="bench", event_id=f"kv-{int(time.time())}",
                        deadline=now + timedelta(seconds=900), detected_at=now)
        async with httpx.AsyncClient() as http:
            ctx = DrainContext(config=config, notice=notice, deadline=notice.deadline, dry_run=False,
                               metrics=Metrics(), log=structlog.get_logger("bench"), http=http,
                               services=Services(identity=Identity(cloud="bench", instance_id="i-bench"),
                                                 engine=NoEngine(), journal=journal))
            before = status_kib("VmRSS")
            started = time.perf_counter()
            detail = await take_snapshot(ctx, snapshotter)
            seconds = time.perf_counter() - started
        tg.cancel_scope.cancel()
    return {"slot_mb": round(size / 2**20), "rss_before_mb": round(before / 1024, 1),
            "peak_rss_mb": round(status_kib("VmHWM") / 1024, 1), "seconds": round(seconds, 2),
            "mb_s": round(size / 1e6 / seconds, 1), "detail": detail}


if __name__ == "__main__":
    store_url, endpoint, key_file, master, slot_dir = sys.argv[1:6]
    print(json.dumps(anyio.run(main, store_url, endpoint, key_file, Path(master), Path(slot_dir))))
