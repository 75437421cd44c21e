"""The control socket over a real Unix socket: endpoints, refusals, file modes, and the client's errors."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from spotguard.config import Config, ControlConfig
from spotguard.control import ControlConflict
from spotguard.control import client as control
from spotguard.control.server import open_socket, serve_control
from spotguard.errors import ControlError
from spotguard.metrics import Metrics
from spotguard.notice import rfc3339, utcnow, window

pytestmark = pytest.mark.anyio


class Runner:
    """A Controller as control/controller.py describes it, answering as the daemon's runner does: a dry
    run changes nothing and answers with the plan; a real drain answers ``accepted``."""

    def __init__(self) -> None:
        self.state = "serving"
        self.notice: dict[str, Any] | None = None
        self.calls: list[tuple[str, Any]] = []

    async def manual_drain(self, reason: str, deadline_seconds: float | None, dry_run: bool) -> dict[str, Any]:
        self.calls.append(("drain", (reason, deadline_seconds, dry_run)))
        notice = {"source": "manual", "kind": "operator", "event_id": "m-1", "action": "drain", "act_at": None,
                  "deadline": rfc3339(window(deadline_seconds or 120)), "detected_at": rfc3339(utcnow())}
        if dry_run:
            return {"dry_run": True, "notice": notice,
                    "steps": [{"name": "readiness", "state": "done", "outcome": "dry_run"}]}
        self.state, self.notice = "draining", notice
        return {"accepted": True, "state": self.state, "notice": notice}

    async def undrain(self, force: bool) -> dict[str, Any]:
        self.calls.append(("undrain", force))
        self.state, self.notice = "serving", None
        return {"accepted": True, "state": "serving"}

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "cloud": "aws", "notice": self.notice, "steps": []}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp dirs are 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="spotguard-control-"))
    path.chmod(0o755)
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() or child.is_symlink() else child.rmdir()
    path.rmdir()


@asynccontextmanager
async def served(cfg: ControlConfig, runner: Runner) -> AsyncIterator[Metrics]:
    metrics = Metrics()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_control(cfg, runner, log=structlog.get_logger("test"),
                                                        metrics=metrics, task_status=task_status))
        yield metrics
        tg.cancel_scope.cancel()


async def test_drain_status_undrain_over_the_socket(sock_dir: Path) -> None:
    path = sock_dir / "run" / "control.sock"  # the parent is created
    cfg = Config().replace("control", socket=str(path), mode="0660", group="nogroup").control
    runner = Runner()
    with anyio.fail_after(15):
        async with served(cfg, runner):
            info = path.stat()
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
            assert info.st_gid == grp.getgrnam("nogroup").gr_gid
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755

            assert (await control.status(str(path)))["state"] == "serving"
            # A dry run reaches the runner with dry_run set, shows the plan, and leaves the node serving.
            plan = await control.drain(str(path), reason="kernel upgrade", deadline_seconds=90, dry_run=True)
            assert plan["dry_run"] is True and plan["notice"]["source"] == "manual" and plan["steps"]
            assert runner.calls == [("drain", ("kernel upgrade", 90.0, True))]
            assert (await control.status(str(path)))["state"] == "serving"
            doc = await control.drain(str(path), reason="kernel upgrade", deadline_seconds=90)
            assert doc["accepted"] is True and doc["state"] == "draining"
            assert runner.calls[-1] == ("drain", ("kernel upgrade", 90.0, False))
            assert (await control.status(str(path)))["notice"]["source"] == "manual"
            # A manual drain may be undone without force.
            assert (await control.undrain(str(path)))["state"] == "serving"
            assert runner.calls[-1] == ("undrain", False)

            # A live cloud notice: undrain is refused with a clear message unless forced.
            runner.state = "draining"
            runner.notice = {"source": "aws", "kind": "spot-interruption", "event_id": "i-1",
                             "deadline": rfc3339(window(100)), "detected_at": rfc3339(utcnow())}
            calls = len(runner.calls)
            with pytest.raises(ControlConflict, match="refusing to undrain: a aws spot-interruption notice"):
                await control.undrain(str(path))
            # Refused at the socket: the runner was never asked, and it still drains.
            assert len(runner.calls) == calls and runner.state == "draining"
            assert (await control.undrain(str(path), force=True))["state"] == "serving"
            assert runner.calls[-1] == ("undrain", True)
    assert not path.exists()  # removed on the way out


async def test_bad_requests_get_clear_answers(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    cfg = ControlConfig(socket=str(path), mode="0600")
    runner = Runner()
    with anyio.fail_after(15):
        async with served(cfg, runner) as metrics:
            transport = httpx.AsyncHTTPTransport(uds=str(path))
            async with httpx.AsyncClient(transport=transport, base_url="http://spotguard") as http:
                bad_json = await http.post("/drain", content=b"{nope")
                unknown = await http.post("/drain", json={"reason": "x", "deadline": 5})
                negative = await http.post("/drain", json={"deadline_seconds": -1})
                wrong_method = await http.get("/drain")
                missing = await http.get("/nothing")
                empty = await http.post("/drain")
            assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]
            assert unknown.status_code == 400 and "unknown fields ['deadline']" in unknown.json()["error"]
            assert negative.status_code == 400 and "deadline_seconds" in negative.json()["error"]
            assert wrong_method.status_code == 405 and missing.status_code == 404
            assert empty.status_code == 200 and runner.calls == [("drain", ("manual drain", None, False))]
            with pytest.raises(ControlError, match=r"deadline_seconds must be a positive number .*HTTP 400"):
                await control.drain(str(path), deadline_seconds=0)
            errors = metrics.registry.get_sample_value("spotguard_errors_total",
                                                       {"component": "control", "reason": "http_400"})
            assert errors == 4


async def test_a_live_socket_is_never_stolen_and_a_stale_one_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    cfg = ControlConfig(socket=str(path), mode="0660")
    with anyio.fail_after(15):
        async with served(cfg, Runner()):
            with pytest.raises(ControlError, match="already listening"):
                open_socket(cfg)
            assert (await control.status(str(path)))["state"] == "serving"
    stale = open_socket(cfg)
    stale.close()  # the file stays behind, nobody listens
    with pytest.raises(ControlError, match="nothing is listening on .*start the daemon"):
        await control.status(str(path))
    with anyio.fail_after(15):
        async with served(cfg, Runner()):
            assert (await control.status(str(path)))["state"] == "serving"


async def test_missing_socket_says_what_to_do(sock_dir: Path) -> None:
    with pytest.raises(ControlError, match=r"no control socket at .*is the spotguard daemon running"):
        await control.status(str(sock_dir / "absent.sock"))


def test_unknown_group_is_a_config_error(sock_dir: Path) -> None:
    from spotguard.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[control\] group: there is no group named 'no-such-group'"):
        open_socket(ControlConfig(socket=str(sock_dir / "c.sock"), group="no-such-group"))


AS_NOBODY = r"""
import json, os, sys
import anyio
from spotguard.control import client
from spotguard.errors import ControlError

path = sys.argv[1]


async def main() -> dict:
    try:  # the first call imports what connecting needs, while /root (the interpreter's home) is readable
        await client.status(path + ".absent")
    except ControlError:
        pass
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)  # nobody / nogroup
    try:
        return {"ok": await client.status(path)}
    except ControlError as exc:
        return {"error": str(exc)}


print(json.dumps(anyio.run(main)))
"""


def as_nobody(path: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", AS_NOBODY, str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to user nobody")
async def test_permission_denied_names_the_fix(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    with anyio.fail_after(60):
        async with served(ControlConfig(socket=str(path), mode="0600"), Runner()):
            assert path.stat().st_uid == 0
            result = await anyio.to_thread.run_sync(as_nobody, path)
            assert result == {"error": f"permission denied on {path}: run as root, or set [control] group "
                                       "so a group of operators may use it"}
        # The group the socket is shared with is named in the hint; its members get in.
        async with served(ControlConfig(socket=str(path), mode="0660", group="nogroup"), Runner()):
            result = await anyio.to_thread.run_sync(as_nobody, path)
            assert result["ok"]["state"] == "serving"
        async with served(ControlConfig(socket=str(path), mode="0660", group="daemon"), Runner()):
            result = await anyio.to_thread.run_sync(as_nobody, path)
            assert result == {"error": f"permission denied on {path}: run as root or add your user to group "
                                       "daemon ([control] group)"}
