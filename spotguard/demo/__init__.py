"""``spotguard demo``: the whole mission on this machine, with real parts and no cloud.

A llama-server (tiny model) behind the gate, a second replica as its peer, requests in flight from a real
client, an AWS spot notice on the metadata emulator; then the daemon drains: /readyz 503, the engine told to
stop, deregistration from an ELBv2 target group on moto, in-flight requests finished, a snapshot to a
file:// store, webhooks to a local receiver. The ending is the timeline, what the clients received, and
``in-flight requests: N sent, N completed, N lost``.

Modules: ``engines`` (llama-server or the stand-in), ``balancer`` (moto), ``node`` (the config),
``traffic`` (the client), ``hooks`` (the webhook receiver), ``scenario`` (the story), ``report``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from spotguard import logs
from spotguard.demo.processes import Processes
from spotguard.demo.report import report
from spotguard.demo.scenario import FULL, SHORT, Run, story


@dataclass(frozen=True)
class Options:
    short: bool = False
    """Fewer, shorter requests and a shorter notice (the test's run)."""
    llama: bool = True
    """False: run the stand-in engine even when llama-server is there."""
    build: bool = True
    """Build llama-server when it is not cached (minutes, once)."""
    workdir: Path | None = None
    """Where the config, logs, snapshot store and picture go; default a new directory under /tmp."""


def run_demo(options: Options = Options(), say: Callable[[str], None] = print) -> tuple[Run, str]:
    """The demo from synchronous code (the CLI). Ctrl-C cancels the story, which stops its processes."""
    return anyio.run(lambda: demo(options, say), backend="asyncio")


async def demo(options: Options = Options(), say: Callable[[str], None] = print) -> tuple[Run, str]:
    """Run the story, then stop every process it started, also on cancellation or failure.

    Returns what happened and the summary line.
    """
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="spotguard-demo-"))
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir / "logs")
    log_file = open(workdir / "logs" / "demo.log", "a")  # the emulator's and receiver's own logs  # noqa: SIM115
    logs.configure("json", "info", stream=log_file)
    run = Run(workdir, procs=procs)
    plan = SHORT if options.short else FULL
    say(f"spotguard demo: a spot eviction on this machine, with real parts and no cloud (files in {workdir})")
    try:
        await story(procs, run, plan, say, want_llama=options.llama, build=options.build)
    finally:
        killed = procs.stop_all()  # blocking on purpose: it must run to the end even when cancelled
        log_file.close()
        say(f"stopped the {len(procs.children) + len(procs.foreign)} processes the demo started"
            + (f" (SIGKILL needed: {', '.join(killed)})" if killed else ""))
    return run, report(run, say)
