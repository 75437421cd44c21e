"""A drain killed with SIGKILL mid-step and resumed from its persisted timeline in a new process.

The state goes through the daemon's own StateStore, in the shape the runner gives it (the node state,
the notice and the timeline as one document), so a change to how state is written is tested here too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.agent.state import StateStore
from spotguard.drain import DrainEngine, Timeline, plan
from spotguard.notice import Notice
from tests.drain.support import FakeEngine, config, context, services

pytestmark = pytest.mark.anyio

DRAIN = r"""
import json, sys
import anyio, httpx
from spotguard.agent.state import Persisted, StateStore, current_boot_id
from spotguard.drain import DrainEngine, plan
from spotguard.notice import Notice
from tests.drain.support import FakeEngine, config, context, services

state_dir, notice_file = sys.argv[1], sys.argv[2]


async def main():
    notice = Notice.from_json(json.load(open(notice_file)))
    store = StateStore(state_dir)

    def persist(timeline):
        # What the runner does with each change: the whole node state, through the store.
        store.save(Persisted(state="draining", notice=notice, timeline=timeline, boot_id=current_boot_id()))

    cfg = config()
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice, services(FakeEngine(stop_delay=60)), http)
        await DrainEngine(plan(cfg), ctx, on_change=persist).run()

anyio.run(main)
"""


def _timeline(store: StateStore) -> Timeline | None:
    persisted, error = store.load()
    assert error is None, error
    return persisted.timeline


async def test_kill_9_mid_drain_then_resume(tmp_path: Path) -> None:
    from tests.drain.support import notice as make_notice

    the_notice = make_notice(seconds=60)
    notice_file = tmp_path / "notice.json"
    notice_file.write_text(json.dumps(the_notice.to_json()))
    store = StateStore(tmp_path / "state")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", DRAIN, str(store.dir), str(notice_file)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(30):
            while True:  # until the stuck stop_accepting is on disk as running
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode() if proc.stderr else "drain exited")
                seen = _timeline(store)
                if seen is not None and seen.step("stop_accepting").state == "running" and \
                        seen.step("readiness").state == "done":
                    break
                await anyio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    saved, error = store.load()  # what a restarted daemon reads
    assert error is None and saved.state == "draining"
    assert saved.notice == Notice.from_json(the_notice.to_json())  # millisecond times, as written
    persisted = saved.timeline
    assert persisted is not None and persisted.finished_at is None
    engine = FakeEngine()
    refused: list[bool] = []
    cfg = config()
    notice = saved.notice
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice, services(engine, refuse_new_work=refused.append), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx, timeline=persisted).run()
    assert refused == []  # readiness was done before the kill: not repeated
    assert timeline.step("readiness").attempts == 1
    assert len(engine.stop_calls) == 1 and timeline.step("stop_accepting").attempts == 2
    assert timeline.step("stop_accepting").outcome == "ok"
    assert timeline.started_at == persisted.started_at
    assert all(r.state == "done" for r in timeline.steps) and timeline.result == "ok"
