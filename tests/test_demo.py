"""``spotguard demo --short`` as a test, so the demo cannot rot: the summary line is what the clients
received, and every step of the drain did real work (moto, the file:// store, the webhook receiver)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import anyio
import pytest

from spotguard.demo import Options, demo
from spotguard.demo.report import manifests
from spotguard.demo.scenario import SHORT, Run
from spotguard.demo.traffic import summary_line
from tests.support.llama import find_llama_server

pytestmark = pytest.mark.anyio
SUMMARY = re.compile(r"^in-flight requests: (\d+) sent, (\d+) completed, (\d+) lost(; (\d+) finished by replica 2 "
                     r"after this node's deadline)?( \(.+\))?$")
DEMO_TIMEOUT = 150.0
"""The short demo takes ~15 s alone; a busy 2-core machine may be several times slower."""


async def _demo(tmp_path: Path, *, llama: bool) -> tuple[Run, str, list[str]]:
    printed: list[str] = []
    with anyio.fail_after(DEMO_TIMEOUT):
        run, line = await demo(Options(short=True, llama=llama, build=False, workdir=tmp_path), printed.append)
    return run, line, printed


def _check(run: Run, line: str, printed: list[str]) -> None:
    assert printed[-1] == line  # the summary is the last line printed
    match = SUMMARY.match(line)
    assert match, line
    sent, completed, lost = (int(g) for g in match.groups()[:3])
    assert line.startswith(summary_line(run.answers, vm_gone_at=run.vm_gone_at))
    assert sent == len(SHORT.asks) == len(run.answers)
    assert completed == sum(a.completed for a in run.answers) and sent == completed + lost
    assert run.node is not None
    assert lost == 0, [a.outcome() for a in run.answers]  # what outlasts the window is finished by replica 2
    assert match.group(5) == "1", line  # the long stream: after this node's deadline, whole all the same
    outcomes = {s["name"]: s["outcome"] for s in run.status["steps"]}
    assert {k: outcomes[k] for k in ("readiness", "stop_accepting", "deregister", "snapshot", "notify_start",
                                     "notify_end")} == dict.fromkeys(
        ("readiness", "stop_accepting", "deregister", "snapshot", "notify_start", "notify_end"), "ok"), outcomes
    assert outcomes["wait_inflight"] in ("ok", "handed_over"), outcomes  # what outlasts the wait goes to a peer
    assert run.group is not None and run.registered_after == []  # moto says: deregistered
    [(_, manifest)] = manifests(run.node.store)
    # What was still running after the wait was continued on replica 2; the snapshot records it with
    # the peer that took it (migrated_to), so `spotguard resume` leaves it alone.
    assert manifest["complete"] and manifest["requests"] <= 1 and outcomes["migrate"] == "ok", manifest
    for path in run.node.store.rglob("records/*.jsonl"):
        assert all(json.loads(line)["migrated_to"] for line in path.read_text().splitlines())
    assert len(run.webhooks) == 2 and "draining" in run.webhooks[0] and "finished" in run.webhooks[1]
    assert "with errors" not in run.webhooks[1], run.webhooks[1]  # nothing was lost: nobody is paged
    assert run.svg is not None and "<svg" in run.svg.read_text()
    for step in ("readiness", "stop_accepting", "deregister", "wait_inflight", "snapshot", "notify_end"):
        assert step in run.status_text  # the timeline as `spotguard status` prints it
    assert run.procs is not None
    assert all(proc.poll() is not None for _, proc in run.procs.children)
    for _, pid in run.procs.foreign:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_short_demo_with_the_stand_in_engine(tmp_path: Path) -> None:
    run, line, printed = await _demo(tmp_path, llama=False)
    _check(run, line, printed)
    assert line == ("in-flight requests: 3 sent, 3 completed, 0 lost; 1 finished by replica 2 after this node's "
                    "deadline (stand-in engine: --stand-in was given)")
    [(_, manifest)] = manifests(tmp_path / "snapshots")
    assert {o["kind"] for o in manifest["objects"]} == {"records"}


@pytest.mark.llama
async def test_short_demo_with_llama_server(tmp_path: Path) -> None:
    if find_llama_server() is None:
        pytest.skip("llama-server not built: run tools/build-llama-server.sh")
    run, line, printed = await _demo(tmp_path, llama=True)
    assert run.engine_note == "", run.engine_note
    _check(run, line, printed)
