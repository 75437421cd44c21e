"""Stand-in inference engine for the systemd end-to-end check: logs its start and its SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

EVENTS = Path("/e2e/events.log")


def log(text: str) -> None:
    with EVENTS.open("a") as out:
        out.write(f"{time.monotonic():.3f} {text}\n")


def stop(signum: int, frame: object) -> None:
    log("engine-sigterm")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, lambda signum, frame: log("engine-sigusr1"))
Path("/e2e/engine.pid").write_text(str(os.getpid()))
log("engine-start")
while True:
    signal.pause()
