"""kind = command: a real argv, run without a shell, under a timeout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard.errors import ConfigError, EngineError, ManualActionRequired
from spotguard.servers import build_engine
from spotguard.servers.process import process_state
from tests.servers.helpers import server_config

pytestmark = pytest.mark.anyio

RECORDER = """
import json, os, sys
with open(sys.argv[1], "w") as out:
    json.dump({"argv": sys.argv[2:], "ppid": os.getppid()}, out)
"""


async def test_argv_reaches_the_program_untouched_and_no_shell(tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    marker = tmp_path / "pwned"
    tricky = [f"$(touch {marker})", f"a; touch {marker}", "*", "two words", "`id`", "|", ""]
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="command", stop_command=[
            sys.executable, "-c", RECORDER, str(record), *tricky]), http)
        assert adapter.name == "command"
        with anyio.fail_after(20):
            assert (await adapter.stop_accepting(dry_run=True)).startswith(f"would run {sys.executable} -c")
            assert not record.exists()
            assert (await adapter.stop_accepting(dry_run=False)).endswith(": exit 0")
    seen = json.loads(record.read_text())
    assert seen["argv"] == tricky
    assert seen["ppid"] == os.getpid()  # started by us directly, not through /bin/sh
    assert not marker.exists()


async def test_stop_command_failure_names_status_and_stderr() -> None:
    script = "import sys; sys.stderr.write('unit busy: try later\\n'); sys.exit(4)"
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="command", stop_command=[sys.executable, "-c", script]), http)
        with anyio.fail_after(20), pytest.raises(EngineError, match="exited 4: unit busy: try later"):
            await adapter.stop_accepting(dry_run=False)


async def test_hung_command_and_its_children_are_killed(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(120)\n")
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="command", stop_command=[sys.executable, "-c", script],
                                             timeout=2), http)
        # Killed at its 2 s timeout (the error says so), not left for the command's 120 s sleep;
        # fail_after(15) only guards against a hang.
        with anyio.fail_after(15):
            with pytest.raises(EngineError, match=r"did not finish within 2.0s \(killed\)"):
                await adapter.stop_accepting(dry_run=False)
            # The whole process group went, not just the command itself.
            pid = int(child_pid.read_text())
            while process_state(pid) not in (None, "Z"):
                await anyio.sleep(0.02)


@pytest.mark.parametrize(("printed", "expected"), [("7\n", 7), ("  0  ", 0)])
async def test_inflight_command(printed: str, expected: int) -> None:
    async with httpx.AsyncClient() as http:
        config = server_config(kind="command", stop_command=["true"],
                               inflight_command=[sys.executable, "-c", f"print({printed!r}, end='')"])
        with anyio.fail_after(20):
            assert await build_engine(config, http).inflight() == expected


@pytest.mark.parametrize(("script", "message"), [
    ("print('seven')", "printed 'seven', not a whole number"),
    ("print('-1')", "printed '-1', not a whole number"),
    ("print('²')", "printed '²', not a whole number"),
    ("print('x' * 10_000_000)", "not a whole number"),
    ("import sys; sys.exit(2)", "exited 2"),
])
async def test_inflight_command_garbage(script: str, message: str) -> None:
    async with httpx.AsyncClient() as http:
        config = server_config(kind="command", stop_command=["true"],
                               inflight_command=[sys.executable, "-c", script])
        with anyio.fail_after(20), pytest.raises(EngineError, match=message):
            await build_engine(config, http).inflight()


async def test_missing_program_and_no_inflight_command(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="command", stop_command=[str(tmp_path / "nope")]), http)
        with anyio.fail_after(10):
            with pytest.raises(EngineError, match="cannot run .*nope.*No such file"):
                await adapter.stop_accepting(dry_run=False)
            assert await adapter.inflight() is None


async def test_stop_command_required() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match=r"\[server\] stop_command must be set"):
            build_engine(server_config(kind="command"), http)


async def test_resume_needs_a_person() -> None:
    async with httpx.AsyncClient() as http:
        adapter = build_engine(server_config(kind="command", stop_command=["/usr/local/bin/engine-stop"]), http)
        with anyio.fail_after(5):
            detail = await adapter.resume_accepting(dry_run=True)
            assert detail.startswith("would not restart: ") and "restart the engine by hand" in detail
            with pytest.raises(ManualActionRequired, match="stop_command .*engine-stop.*restart the engine by hand"):
                await adapter.resume_accepting(dry_run=False)
