"""An operator's rehearsal, end to end: the real daemon, the gate in front of a real llama-server, moto for
ELBv2, the CLI as a subprocess. Drain, undrain, engine trouble, restarts, SIGTERM and kill -9 mid-drain:
after each, what a client of the gate and a load balancer see must be right.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskGroup

from spotguard.notice import parse_rfc3339, rfc3339, utcnow
from tests.support.llama import LlamaServer
from tests.support.node import Node, NodeConfig, running_node

pytestmark = [pytest.mark.anyio, pytest.mark.llama]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}


@asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        yield http


async def chat(http: httpx.AsyncClient, gate: str) -> int:
    return (await http.post(gate + "/v1/chat/completions", json=CHAT)).status_code


async def test_drain_then_undrain_puts_traffic_and_registration_back(
        tmp_path: Path, node_config: NodeConfig) -> None:
    with running_node(tmp_path, node_config) as node:
        async with client() as http:
            await node.daemon.readyz(http, 200)
            assert await chat(http, node.gate) == 200
            assert node.registered() == [node.instance_id]

            drained = await anyio.to_thread.run_sync(lambda: node.daemon.control("drain", "--deadline", "20"))
            assert drained.returncode == 0, drained.stderr
            await node.daemon.until_status(http, lambda d: d["state"] == "drained")
            body = await node.daemon.readyz(http, 503, timeout=1)
            assert "draining" in body or "drained" in body
            refused = await http.post(node.gate + "/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert node.registered() == []

            undrained = await anyio.to_thread.run_sync(lambda: node.daemon.control("undrain"))
            assert undrained.returncode == 0, undrained.stdout + undrained.stderr
            for step in ("resume_engine", "reopen_gate", "register"):
                assert step in undrained.stdout  # the operator sees what was put back
            await node.daemon.readyz(http, 200, timeout=10)
            assert await chat(http, node.gate) == 200
            assert node.registered() == [node.instance_id]
            doc = await node.daemon.status(http)
    restore = {s["name"]: s["outcome"] for s in doc["restore_steps"]}
    # llama-server is never signalled (the gate refuses new work instead), so there is nothing to start again.
    assert restore == {"resume_engine": "ok", "reopen_gate": "ok", "register": "ok"}, doc["restore_steps"]
    assert "nothing to restart" in doc["restore_steps"][0]["detail"]


async def test_readyz_follows_the_engine_health(tmp_path: Path, node_config: NodeConfig,
                                                llama_server: LlamaServer) -> None:
    with running_node(tmp_path, node_config) as node:
        async with client() as http:
            await node.daemon.readyz(http, 200)
            llama_server.proc.send_signal(signal.SIGSTOP)  # a wedged engine: /health stops answering
            try:
                body = await node.daemon.readyz(http, 503, timeout=10)
                assert "engine" in body
                doc = await node.daemon.status(http)
                assert doc["readiness"]["engine"]["healthy"] is False
            finally:
                llama_server.proc.send_signal(signal.SIGCONT)
            await node.daemon.readyz(http, 200, timeout=10)
            metrics = (await http.get(node.daemon.url + "/metrics")).text
    assert "spotguard_engine_healthy 1.0" in metrics and "spotguard_ready 1.0" in metrics


async def test_readyz_200_means_the_gate_answers_on_every_start(
        tmp_path: Path, node_config: NodeConfig) -> None:
    for _ in range(3):
        with running_node(tmp_path, node_config, machine="running") as node:
            async with client() as http:
                await node.daemon.readyz(http, 200)
                # The instant /readyz says 200, the gate takes a request: never refused, never 503.
                assert (await http.get(node.gate + "/v1/models")).status_code == 200
            node.daemon.signal(signal.SIGTERM)
            assert await node.daemon.wait_exit(15) == 0  # a restart: prompt, and no drain
        state = json.loads((tmp_path / "state" / "state.json").read_text()) \
            if (tmp_path / "state" / "state.json").exists() else {"state": "serving"}
        assert state["state"] == "serving"


async def test_a_late_drain_still_takes_the_node_out(tmp_path: Path,
                                                     node_config: NodeConfig) -> None:
    # A deadline inside the safety margin: the open-ended steps are cut, the safety steps still run.
    with running_node(tmp_path, node_config) as node:
        async with client() as http:
            await node.daemon.readyz(http, 200)
            result = await anyio.to_thread.run_sync(lambda: node.daemon.control("drain", "--deadline", "0.5"))
            assert result.returncode == 0, result.stderr
            doc = await node.daemon.until_status(http, lambda d: d["state"] == "drained")
            assert (await http.post(node.gate + "/v1/chat/completions", json=CHAT)).status_code == 503
            await node.daemon.readyz(http, 503, timeout=1)
    outcomes = {s["name"]: s["outcome"] for s in doc["steps"]}
    assert outcomes["readiness"] == "ok" and outcomes["stop_accepting"] == "ok", doc["steps"]
    assert outcomes["deregister"] == "ok", doc["steps"]
    assert node.registered() == []


async def _long_stream(http: httpx.AsyncClient, gate: str, started: anyio.Event) -> None:
    body = {**CHAT, "max_tokens": 100000, "stream": True, "ignore_eos": True}
    try:
        async with http.stream("POST", gate + "/v1/chat/completions", json=body,
                               timeout=httpx.Timeout(60.0)) as response:
            async for _ in response.aiter_raw():
                started.set()
    except httpx.HTTPError:
        pass  # the drain cuts it: what the client sees then is the gate's business (tests/gate)


def _manifests(store: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(store.rglob("manifest.json"))]


async def _drain_with_a_stream(node: Node, http: httpx.AsyncClient, tg: TaskGroup, deadline: str) -> None:
    """A long stream in flight through the gate, then `spotguard drain --deadline DEADLINE`."""
    await node.daemon.readyz(http, 200)
    started = anyio.Event()
    tg.start_soon(_long_stream, http, node.gate, started)
    with anyio.fail_after(10):
        await started.wait()
    result = await anyio.to_thread.run_sync(lambda: node.daemon.control("drain", "--deadline", deadline))
    assert result.returncode == 0, result.stderr


def _persisted_step(tmp_path: Path, name: str) -> str:
    """The state of drain step ``name`` as the state file on disk has it ("" before it is there)."""
    try:
        doc = json.loads((tmp_path / "state" / "state.json").read_text())
        steps = doc["timeline"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return next((str(s.get("state")) for s in steps if s.get("name") == name), "")


async def test_sigterm_mid_drain_is_bounded_by_the_shutdown_budget(
        tmp_path: Path, node_config: NodeConfig) -> None:
    with running_node(tmp_path, node_config) as node:
        async with client() as http, anyio.create_task_group() as tg:
            await _drain_with_a_stream(node, http, tg, "600")
            await node.daemon.until_status(http, lambda d: any(
                s["name"] == "wait_inflight" and s["state"] == "running" for s in d["steps"]))
            node.daemon.signal(signal.SIGTERM)  # the machine shuts down mid-drain ([shutdown] budget = 10 s)
            assert await node.daemon.wait_exit(30) == 0  # hang guard
            tg.cancel_scope.cancel()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["state"] == "drained"
    # By the daemon's own record, not a stopwatch: the 600 s drain was pulled in to the shutdown's 10 s
    # budget, and it ended by that deadline.
    timeline = state["timeline"]
    started, deadline = parse_rfc3339(timeline["started_at"]), parse_rfc3339(timeline["deadline"])
    assert deadline - started < timedelta(seconds=300), timeline
    assert timeline["finished_at"] is not None and parse_rfc3339(timeline["finished_at"]) <= deadline, timeline
    manifests = _manifests(node.store)
    assert manifests and manifests[0]["requests"] == 1, manifests


async def test_kill_9_mid_drain_then_restart_resumes_without_repeating_steps(
        tmp_path: Path, node_config: NodeConfig) -> None:
    async with client() as http:
        with running_node(tmp_path, node_config) as node:
            async with anyio.create_task_group() as tg:
                await _drain_with_a_stream(node, http, tg, "40")
                # The kill lands once the state file (written off the event loop) has the step running.
                with anyio.fail_after(15):
                    while _persisted_step(tmp_path, "wait_inflight") != "running":
                        await anyio.sleep(0.02)
                node.daemon.signal(signal.SIGKILL)
                await node.daemon.wait_exit(10)
                tg.cancel_scope.cancel()
        with running_node(tmp_path, node_config) as node:
            doc = await node.daemon.until_status(http, lambda d: d["state"] == "drained", timeout=60)
            assert (await http.post(node.gate + "/v1/chat/completions", json=CHAT)).status_code == 503
    attempts = {s["name"]: s["attempts"] for s in doc["steps"]}
    assert attempts["readiness"] == 1 and attempts["stop_accepting"] == 1 and attempts["deregister"] == 1, attempts
    assert attempts["wait_inflight"] == 2, attempts


async def test_a_rerun_snapshot_never_replaces_a_manifest_with_an_emptier_one(
        tmp_path: Path, node_config: NodeConfig) -> None:
    # The crash this stands for: the manifest is written, then the daemon dies before the step's end is on
    # disk. The restarted daemon runs the snapshot step again, with nothing in flight any more.
    async with client() as http:
        with running_node(tmp_path, node_config) as node:
            async with anyio.create_task_group() as tg:
                await _drain_with_a_stream(node, http, tg, "6")
                await node.daemon.until_status(http, lambda d: d["state"] == "drained", timeout=30)
                tg.cancel_scope.cancel()
            node.daemon.signal(signal.SIGKILL)
            await node.daemon.wait_exit(10)
        before = _manifests(node.store)
        assert before and before[0]["requests"] == 1, before
        state_file = tmp_path / "state" / "state.json"
        state = json.loads(state_file.read_text())
        state["state"] = "draining"
        steps = state["timeline"]["steps"]
        for step in steps:
            if step["name"] in ("snapshot", "acknowledge", "notify_end"):
                step.update(state="running", outcome=None, finished_at=None, duration=None)
        state["timeline"]["finished_at"] = state["timeline"]["result"] = None
        later = rfc3339(utcnow() + timedelta(seconds=60))  # time enough for the rerun to really write
        state["notice"]["deadline"] = state["timeline"]["deadline"] = later
        state["deadline"].update(vm=later, drain=later)
        state_file.write_text(json.dumps(state))
        with running_node(tmp_path, node_config) as node:
            await node.daemon.until_status(http, lambda d: d["state"] == "drained", timeout=30)
    after = _manifests(node.store)
    assert after == before or (len(after) == 1 and after[0]["requests"] >= before[0]["requests"]), (before, after)

