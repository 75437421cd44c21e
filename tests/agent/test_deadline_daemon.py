"""The VM's deadline reaches the gate's relays: after the drain is over, and across a restart of the daemon.

A stream still running when the node drains is continued on a slow peer and relayed by the node's gate; the
gate must end it with a retryable error event just before the VM goes away, never let it run into a torn
connection. Two ways that went wrong (issue 16): an earlier notice that came once the drain was over never
reached the gate, and a daemon restarted mid-drain told the gate to drain with no deadline at all.

Real processes over loopback: the daemon (``spotguard run``) and the gate process it starts; the node's
engine and the peer are fake OpenAI engines served in this process (the peer streams one token every
``x_token_delay`` seconds, so the relayed answer would run far past the deadline).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.support._daemon import Daemon, daemon, write_config
from tests.support.moto import free_port
from tests.support.openai_upstream import FakeEngine, stream_chat

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
TOKENS, TOKEN_DELAY = 3000, 0.02
"""A stream of about 60 s: far longer than any deadline here."""
FIRST_DEADLINE = 60
EARLIER_DEADLINE = 8
RESTART_DEADLINE = 15
"""Seconds: time for the migration, a kill -9 and a Python start-up of the daemon on a busy machine."""


class RelayedStream:
    """One streamed chat completion through the node's gate: its events, and when its body ended."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.first = anyio.Event()
        self.ended = anyio.Event()
        self.ended_at = 0.0

    async def run(self, http: httpx.AsyncClient, gate: str) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": TOKENS, "x_token_delay": TOKEN_DELAY}
        try:
            await stream_chat(http, gate + CHAT, body, self.events, self.first)
        finally:
            self.ended_at = time.time()
            self.ended.set()

    async def until_ended(self, by: float, slack: float = 15.0) -> None:
        """Wait for the end of the body, at most ``slack`` seconds past the Unix time ``by``."""
        try:
            with anyio.fail_after(max(0.0, by - time.time()) + slack):
                await self.ended.wait()
        except TimeoutError:
            raise AssertionError(f"the relayed stream was still running {slack:.0f}s after the VM's deadline "
                                 f"({len(self.events)} events)") from None

    def ended_with_a_retryable_error(self) -> bool:
        last = self.events[-1] if self.events else None
        return isinstance(last, dict) and last.get("error", {}).get("type") == "interrupted_for_migration"


def node_config(tmp_path: Path, engine: FakeEngine, peer: FakeEngine) -> tuple[Path, str, str]:
    """The daemon's config, its URL and its gate's URL."""
    http_port, gate_port = free_port(), free_port()
    config = write_config(tmp_path, "none", "", http_port, extra=f"""
[drain]
safety_margin = 1.0
wait_inflight_budget = 1.0
[gate]
listen = "127.0.0.1:{gate_port}"
upstream = "{engine.url}"
peers = ["{peer.url}"]
""")
    return config, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gate_port}"


async def drain(node: Daemon, seconds: float) -> float:
    """``spotguard drain --deadline SECONDS``; returns a Unix time no earlier than the VM deadline it set."""
    done = await anyio.to_thread.run_sync(lambda: node.control("drain", "--reason", "test", "--deadline",
                                                               str(seconds)))
    assert done.returncode == 0, done.stdout + done.stderr
    return time.time() + seconds


async def migrated_and_drained(node: Daemon, http: httpx.AsyncClient) -> None:
    doc = await node.until_status(http, lambda d: d["state"] == "drained", timeout=30)
    steps = {s["name"]: s for s in doc["steps"]}
    # Handed to a peer on purpose (by the gate when the drain began: it could not finish here), not a
    # time-out, and the drain lost nothing.
    assert steps["wait_inflight"]["outcome"] in ("ok", "handed_over"), steps["wait_inflight"]
    assert steps["migrate"]["outcome"] == "ok" and steps["migrate"]["handed_over"] == 1, steps["migrate"]
    assert doc["drain_result"] == "ok, with 1 request handed to peers"


async def test_an_earlier_notice_after_the_drain_ends_the_relays_before_the_new_deadline(
        tmp_path: Path, fake_engine: FakeEngine, peer_engine: FakeEngine) -> None:
    config, url, gate = node_config(tmp_path, fake_engine, peer_engine)
    relayed = RelayedStream()
    with daemon(config, tmp_path / "daemon.log", url) as node:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http, anyio.create_task_group() as tg:
            await node.readyz(http, 200)
            tg.start_soon(relayed.run, http, gate)
            with anyio.fail_after(20):
                await relayed.first.wait()
            await drain(node, FIRST_DEADLINE)
            await migrated_and_drained(node, http)
            assert not relayed.ended.is_set()  # the peer's answer is relayed after the drain is over
            vm_deadline = await drain(node, EARLIER_DEADLINE)  # an earlier notice: the VM goes sooner
            await relayed.until_ended(vm_deadline)
    assert relayed.ended_with_a_retryable_error(), relayed.events[-2:]
    assert relayed.ended_at < vm_deadline, f"ended {relayed.ended_at - vm_deadline:.2f}s after the VM's deadline"


async def test_a_daemon_restarted_after_the_migration_keeps_the_relays_to_the_deadline(
        tmp_path: Path, fake_engine: FakeEngine, peer_engine: FakeEngine) -> None:
    config, url, gate = node_config(tmp_path, fake_engine, peer_engine)
    state = tmp_path / "state" / "state.json"
    relayed = RelayedStream()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http, anyio.create_task_group() as tg:
        with daemon(config, tmp_path / "daemon.log", url) as node:
            await node.readyz(http, 200)
            tg.start_soon(relayed.run, http, gate)
            with anyio.fail_after(20):
                await relayed.first.wait()
            vm_deadline = await drain(node, RESTART_DEADLINE)
            await migrated_and_drained(node, http)
            with anyio.fail_after(10):  # durable before the kill: the restarted daemon starts from "drained"
                while '"state": "drained"' not in (state.read_text() if state.exists() else ""):
                    await anyio.sleep(0.02)
            node.proc.kill()
            await node.wait_exit(10)
        assert not relayed.ended.is_set()  # the gate outlives the daemon, and so does the relay
        with daemon(config, tmp_path / "daemon.log", url) as restarted:
            await restarted.until_status(http, lambda d: d["state"] == "drained", timeout=30)
            await relayed.until_ended(vm_deadline)
    assert relayed.ended_with_a_retryable_error(), relayed.events[-2:]
    assert relayed.ended_at < vm_deadline, f"ended {relayed.ended_at - vm_deadline:.2f}s after the VM's deadline"
