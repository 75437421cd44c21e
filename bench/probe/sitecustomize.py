"""A probe for pauses inside ``spotguard gate`` under a bench's load: garbage collections and late loop starts.

    GATE_PROBE_DIR=/tmp/probe PYTHONPATH=bench/probe \\
        .venv/bin/python bench/gate.py --rounds 3 --seconds 6 --no-nginx --only stream:200

Python imports ``sitecustomize`` at start-up in every process whose path holds this folder; the probe arms
itself only in a ``spotguard gate`` process, and only when ``GATE_PROBE_DIR`` names where to write (not a
``SPOTGUARD_`` name: the gate's configuration refuses environment variables it does not know):

- ``gc-PID.log``: every collection, its generation and how long it took;
- ``lag-PID.log``: each time the event loop ran a callback more than 3 ms after a thread handed it over
  (every 5 ms), with the CPU time the loop's thread used meanwhile: about as much as the lag, the gate was
  busy with its own work; about none, the process was waiting for a core (or blocked in a system call).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

LATE_MS = 3.0
EVERY_S = 0.005


def _running_loop() -> Any:
    """The gate's uvloop loop, once it runs (found among live objects: the probe does not touch the gate's code)."""
    while True:
        time.sleep(0.5)
        for thing in gc.get_objects():
            kind = type(thing)
            if kind.__name__ == "Loop" and str(kind.__module__).startswith("uvloop") and thing.is_running():
                return thing


def _watch_loop(out: TextIO, main_cpu_clock: int) -> None:
    loop = _running_loop()

    def ran(handed_at: float, cpu_at: float) -> None:
        late_ms = (time.perf_counter() - handed_at) * 1e3
        if late_ms > LATE_MS:
            cpu_ms = (time.thread_time() - cpu_at) * 1e3
            out.write(f"{time.time():.3f} late {late_ms:.1f} ms, loop thread cpu {cpu_ms:.1f} ms\n")

    while True:
        time.sleep(EVERY_S)
        loop.call_soon_threadsafe(ran, time.perf_counter(), time.clock_gettime(main_cpu_clock))


def _watch_gc(out: TextIO) -> None:
    started = [0.0]

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took_ms = (time.perf_counter() - started[0]) * 1e3
        out.write(f"{time.time():.3f} gen{info['generation']} {took_ms:.2f} ms collected={info['collected']}\n")

    gc.callbacks.append(collected)


def _arm(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    _watch_gc(open(folder / f"gc-{pid}.log", "w", buffering=1))  # noqa: SIM115 - open for the process's life
    clock = time.pthread_getcpuclockid(threading.main_thread().ident or 0)
    lag = open(folder / f"lag-{pid}.log", "w", buffering=1)  # noqa: SIM115
    threading.Thread(target=_watch_loop, args=(lag, clock), daemon=True, name="probe").start()


if os.environ.get("GATE_PROBE_DIR") and "gate" in sys.argv and "--config" in sys.argv:
    _arm(Path(os.environ["GATE_PROBE_DIR"]))
