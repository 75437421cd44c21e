"""A drain killed with SIGKILL mid-step and resumed from its persisted timeline in a new process."""

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

from spotguard.drain import DrainEngine, Timeline, plan
from spotguard.notice import Notice
from tests.drain.support import FakeEngine, config, context, services

pytestmark = pytest.mark.anyio

DRAIN = r"""
import json, os, sys
import anyio, httpx
from spotguard.drain import DrainEngine, plan
from spotguard.notice import Notice
from tests.drain.support import FakeEngine, config, context, services

state, notice_file = sys.argv[1], sys.argv[2]


def persist(timeline):
    # What the runner does: write beside, then rename, so a kill never leaves half a file.
    tmp = state + ".tmp"
    with open(tmp, "w") as out:
        json.dump(timeline.to_json(), out)
    os.replace(tmp, state)


async def main():
    notice = Notice.from_json(json.load(open(notice_file)))
    cfg = config()
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice, services(FakeEngine(stop_delay=60)), http)
        await DrainEngine(plan(cfg), ctx, on_change=persist).run()

anyio.run(main)
"""


async def test_kill_9_mid_drain_then_resume(tmp_path: Path) -> None:
    from tests.drain.support import notice as make_notice

    the_notice = make_notice(seconds=60)
    notice_file = tmp_path / "notice.json"
    notice_file.write_text(json.dumps(the_notice.to_json()))
    state = tmp_path / "drain.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", DRAIN, str(state), str(notice_file)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(30):
            while True:  # until the stuck stop_accepting is on disk as running
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode() if proc.stderr else "drain exited")
                if state.exists():
                    persisted = Timeline.from_json(json.loads(state.read_text()))
                    if persisted.step("stop_accepting").state == "running" and \
                            persisted.step("readiness").state == "done":
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

    persisted = Timeline.from_json(json.loads(state.read_text()))
    assert persisted.finished_at is None
    engine = FakeEngine()
    ready: list[bool] = []
    cfg = config()
    notice = Notice.from_json(json.loads(notice_file.read_text()))
    async with httpx.AsyncClient() as http:
        ctx = context(cfg, notice, services(engine, set_ready=ready.append), http)
        with anyio.fail_after(10):
            timeline = await DrainEngine(plan(cfg), ctx, timeline=persisted).run()
    assert ready == []  # readiness was done before the kill: not repeated
    assert timeline.step("readiness").attempts == 1
    assert len(engine.stop_calls) == 1 and timeline.step("stop_accepting").attempts == 2
    assert timeline.step("stop_accepting").outcome == "ok"
    assert timeline.started_at == persisted.started_at
    assert all(r.state == "done" for r in timeline.steps) and timeline.result == "ok"
