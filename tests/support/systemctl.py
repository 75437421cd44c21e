"""A stand-in for ``systemctl`` (no systemd runs here), put first on PATH by the ``systemctl`` fixture.

It logs its argv (one JSON list a line) to ``STUB_LOG`` and acts as systemd would for one unit whose
main pid is in the file ``mainpid``:

- ``show -p MainPID --value U`` prints that pid;
- ``kill --signal=S --kill-who=main U`` sends S to it;
- ``start --no-block U`` starts the argv in ``STUB_START`` (a JSON list) as a new process, detached
  like a unit's, and writes its pid to ``mainpid``; the fixture kills what it started at teardown.

``STUB_FAIL`` set: every call fails as an access-denied systemctl does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEMCTL = """
import json, os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("STUB_FAIL"):
    sys.stderr.write("Failed to kill unit engine.service: Access denied\\n")
    sys.exit(1)
main_pid_file = os.environ["STUB_MAINPID"]
main_pid = int(open(main_pid_file).read())
if args[:4] == ["show", "-p", "MainPID", "--value"] and len(args) == 5:
    print(main_pid)
elif args[0] == "kill" and args[2] == "--kill-who=main" and len(args) == 4:
    os.kill(main_pid, signal.Signals[args[1].removeprefix("--signal=")])
elif args[:2] == ["start", "--no-block"] and len(args) == 3 and os.environ.get("STUB_START"):
    with open(os.environ["STUB_LOG"] + ".unit", "ab") as out:
        proc = subprocess.Popen(json.loads(os.environ["STUB_START"]), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    open(main_pid_file, "w").write(str(proc.pid))
    with open(os.environ["STUB_LOG"] + ".started", "a") as started:
        started.write(f"{proc.pid}\\n")
elif args[:2] == ["start", "--no-block"] and len(args) == 3:
    sys.stderr.write(f"Failed to start {args[2]}: Unit {args[2]} not found.\\n")
    sys.exit(5)
else:
    sys.stderr.write("Unknown command verb\\n")
    sys.exit(1)
"""


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The stub on PATH; returns the folder holding ``mainpid`` and ``systemctl.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "systemctl"
    stub.write_text(f"#!{sys.executable}\n{SYSTEMCTL}")
    stub.chmod(0o755)
    log = tmp_path / "systemctl.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("STUB_MAINPID", str(tmp_path / "mainpid"))
    yield tmp_path
    started = Path(f"{log}.started")
    for line in started.read_text().split() if started.exists() else []:
        try:
            os.kill(int(line), signal.SIGKILL)
        except ProcessLookupError:
            pass
