"""Stand-in for `spotguard run` that speaks sd_notify through spotguard.sdnotify, as the daemon does.

On SIGTERM it "drains": records whether the engine is still alive, signals it through
`systemctl kill` (as the engine adapters do with [server] unit) from inside the unit's sandbox, and exits. It runs
from the installed virtualenv under the real unit file, so the check covers Type=notify, the
watchdog, the hardening and the ordering drop-in without depending on the rest of the daemon.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio

from spotguard import sdnotify

EVENTS = Path("/e2e/events.log")


def log(text: str) -> None:
    with EVENTS.open("a") as out:
        out.write(f"{time.monotonic():.3f} {text}\n")


def engine_alive() -> bool:
    try:
        os.kill(int(Path("/e2e/engine.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


async def main() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(sdnotify.keep_alive)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            log(f"spotguard-ready watchdog={sdnotify.watchdog_interval()}")
            sdnotify.ready("serving (stand-in)")
            async for _ in signals:
                sdnotify.stopping("draining")
                log(f"spotguard-drain-start engine-alive={engine_alive()}")
                # The hardening must leave this possible: reach PID 1 and signal another unit's process.
                await anyio.run_process(["systemctl", "kill", "--kill-who=main", "--signal=SIGUSR1", "vllm.service"])
                with anyio.fail_after(10):
                    while "engine-sigusr1" not in EVENTS.read_text():
                        await anyio.sleep(0.05)
                log(f"spotguard-drained engine-alive={engine_alive()}")
                tg.cancel_scope.cancel()
                return


anyio.run(main)
