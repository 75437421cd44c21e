"""What spotguard writes is its user's alone, whoever starts it with whatever umask: run by hand from a shell
with umask 022, the daemon and its gate made the state dir 0755, gate.log 0644, and file:// snapshot
directories 0755 with records 0644 - records that hold prompts and outputs. Real processes, a real drain."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support._daemon import daemon, write_config
from tests.support._gate_process import gate_process
from tests.support.moto import free_port
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"


@contextmanager
def shell_umask(mask: int) -> Iterator[None]:
    """Processes started inside inherit ``mask``, as from an operator's shell."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _shell_umask() -> None:
    os.umask(0o022)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]
            if not p.is_socket()}


async def test_state_logs_and_file_snapshots_are_owner_only_whatever_the_umask(fake_engine: FakeEngine,
                                                                               tmp_path: Path) -> None:
    gate_port, http_port = free_port(), free_port()
    store = tmp_path / "snapshots"  # created by the daemon
    config = write_config(tmp_path, "none", "", http_port, extra=f"""
[drain]
safety_margin = 1.0
wait_inflight_budget = 1.0
[gate]
listen = "127.0.0.1:{gate_port}"
upstream = "{fake_engine.url}"
[snapshot]
url = "file://{store}"
""")
    body = {"model": "m", "messages": [{"role": "user", "content": "a prompt that is user data"}], "stream": True,
            "max_tokens": 5, "x_hold_after": 1}
    with shell_umask(0o022), daemon(config, tmp_path / "daemon.log", f"http://127.0.0.1:{http_port}") as node:
        async with httpx.AsyncClient(timeout=30) as http, anyio.create_task_group() as tg:
            await node.readyz(http, 200)
            first = anyio.Event()

            async def held_stream() -> None:
                async with http.stream("POST", f"http://127.0.0.1:{gate_port}{CHAT}", json=body) as response:
                    async for _ in response.aiter_lines():
                        first.set()

            tg.start_soon(held_stream)
            with anyio.fail_after(20):
                await first.wait()
            drained = await anyio.to_thread.run_sync(lambda: node.control("drain", "--deadline", "30"))
            assert drained.returncode == 0, drained.stderr
            await node.until_status(http, lambda d: d["state"] == "drained", timeout=40)
            tg.cancel_scope.cancel()
    state, snapshots = modes(tmp_path / "state"), modes(store)
    records = list(store.rglob("records/*.jsonl"))
    assert records and "a prompt that is user data" in records[0].read_text()
    wrong = {name: oct(mode) for name, mode in {**state, **snapshots}.items() if mode & 0o077}
    assert not wrong, f"readable by others: {wrong}"
    assert state["state"] == 0o700 and state["state/gate.log"] == 0o600


async def test_the_gate_started_by_hand_makes_its_socket_directory_owner_only(fake_engine: FakeEngine,
                                                                              tmp_path: Path) -> None:
    socket_dir = tmp_path / "run" / "spotguard-gate"
    with gate_process(tmp_path, fake_engine.url, preexec_fn=_shell_umask,
                      control=str(socket_dir / "gate.sock")) as gate:
        made = modes(tmp_path / "run")
        assert gate.proc.poll() is None
    assert made == {"run": 0o700, "run/spotguard-gate": 0o700}, {k: oct(v) for k, v in made.items()}
