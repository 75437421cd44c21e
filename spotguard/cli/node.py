"""The commands that run or talk to this node's daemon and gate: run, gate, status, drain, undrain."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from spotguard.cli.common import ConfigOpt, fail, load_config, run_async


def _report(doc: dict[str, Any]) -> None:
    """Print a drain/undrain answer; a refused request exits 1."""
    typer.echo(_control_result(doc))
    if not doc.get("accepted", True):
        raise typer.Exit(1)


def _control_result(doc: dict[str, Any]) -> str:
    """What drain/undrain print: the daemon's message, then the timeline when there is one."""
    from spotguard.control import render

    lines = []
    if doc.get("message"):
        lines.append(str(doc["message"]))
    if doc.get("dry_run"):
        lines.append("dry run: nothing was done; each step says what it would do")
    if "state" in doc or "steps" in doc:
        lines.append(render.format_status({"state": doc.get("state", "serving"), "cloud": doc.get("cloud", ""),
                                           "notice": doc.get("notice"), "steps": doc.get("steps", [])}))
    return "\n".join(lines)


def _private_files() -> None:
    """Files, directories and sockets this process creates are its user's alone (state, logs, file://
    snapshots hold prompts), whoever started it with whatever umask; modes set on purpose (the control
    socket's [control] mode) are applied explicitly and are not affected."""
    os.umask(0o077)


def run(config: ConfigOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Every drain step logs what it would do and does nothing.")] = False,
        listen: Annotated[str | None, typer.Option(metavar="HOST:PORT", help="Override [http] listen.")] = None,  # noqa: UP007
        cloud: Annotated[str | None, typer.Option(metavar="CLOUD", help="Override [agent] cloud "  # noqa: UP007
                                                  "(auto, aws, gcp, azure or none).")] = None) -> None:
    """Run the daemon."""
    from spotguard import logs
    from spotguard.agent.daemon import run_daemon

    _private_files()
    overrides: dict[str, dict[str, Any]] = {}
    if dry_run:
        overrides.setdefault("agent", {})["dry_run"] = True
    if cloud:
        overrides.setdefault("agent", {})["cloud"] = cloud
    if listen:
        overrides.setdefault("http", {})["listen"] = listen
    cfg = load_config(config, overrides)
    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    try:
        code = run_async(lambda: run_daemon(cfg))
    except KeyboardInterrupt:
        code = 1
    raise typer.Exit(code)


def gate(config: ConfigOpt = None,
         stop: Annotated[bool, typer.Option("--stop", help="Ask the running gate to stop (it finishes the "
                                                          "requests in flight first, up to [gate] stop_timeout).")] = False,
         uvloop: Annotated[bool, typer.Option("--uvloop/--no-uvloop", help="Run on uvloop when it is installed.")] = True,
         gc_freeze: Annotated[bool, typer.Option("--gc-freeze/--no-gc-freeze", help="Exempt start-up objects from "
                                                 "garbage collection (shorter GC pauses on the data path).")] = True,
         ) -> None:
    """Run the gate (the reverse proxy in front of the engine) as its own process.

    `spotguard run` starts it when none is running ([gate] start = auto); under systemd it is
    spotguard-gate.service. It outlives the daemon: restarting spotguard never cuts a request in flight.
    """
    from spotguard import logs

    _private_files()
    cfg = load_config(config)
    if not cfg.gate.listen:
        # Not a failure: spotguard-gate.service is installed everywhere and stays inactive where the gate is off.
        typer.echo("spotguard: [gate] listen is empty: the gate is off in this configuration; nothing to run")
        return
    if stop:
        from spotguard.gate.control import call, control_path

        answer = run_async(lambda: call(control_path(cfg), "stop", timeout=5.0))
        typer.echo(f"gate stopping ({answer.get('stopping')})")
        return
    if not cfg.gate.upstream:
        fail("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
    from spotguard.gate.service import run_gate_process

    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    if gc_freeze:
        import gc

        # Everything loaded so far lives as long as the process: a full collection need not walk it again
        # (bench/gate.py: the p99 of 200 streams' first bytes with and without).
        gc.collect()
        gc.freeze()
        # Every request and chunk allocates a few objects that die young; collecting the youngest generation
        # every 700 allocations (the default) costs the data path more than it frees (bench/gate.py).
        gc.set_threshold(50_000, 50, 100)
    import importlib.util

    options = {"use_uvloop": True} if uvloop and importlib.util.find_spec("uvloop") else {}
    try:
        code = run_async(lambda: run_gate_process(cfg), backend_options=options)
    except KeyboardInterrupt:
        code = 1
    raise typer.Exit(code)


def status(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print the /status document.")] = False,
           svg: Annotated[Path | None, typer.Option(  # noqa: UP007
               "--svg", metavar="FILE", help="Also draw the drain timeline as an SVG picture into FILE.")] = None) -> None:
    """Show the node's state, the notice, and the drain timeline."""
    from spotguard.control import client, render

    cfg = load_config(config)
    doc = run_async(lambda: client.status(cfg.control.socket, group=cfg.control.group))
    typer.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else render.format_status(doc))
    if svg is not None:
        from spotguard.control.svg import render_svg

        try:
            svg.write_text(render_svg(doc, safety_margin=cfg.drain.safety_margin))
        except OSError as exc:
            fail(f"--svg {svg}: {exc.strerror or exc}", 1)
        typer.echo(f"timeline picture: {svg}", err=as_json)


def drain(config: ConfigOpt = None,
          reason: Annotated[str, typer.Option(metavar="TEXT", help="Why (shown in status, logs and webhooks).")] = "manual drain",
          deadline: Annotated[float | None, typer.Option(metavar="SECONDS", help="Seconds from now the drain must "  # noqa: UP007
                                                         "end by (default [drain] manual_deadline).")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what each step would do.")] = False) -> None:
    """Drain this node now (through the local control socket)."""
    from spotguard.control import client

    cfg = load_config(config)

    async def start() -> dict[str, Any]:
        doc = await client.drain(cfg.control.socket, reason=reason, deadline_seconds=deadline, dry_run=dry_run,
                                 group=cfg.control.group)
        if not doc.get("accepted") or dry_run or doc.get("started") is False:  # refused, or only a new deadline
            return doc
        # The answer only says the drain began; the status shows the steps it has started since.
        now = await client.status(cfg.control.socket, group=cfg.control.group)
        return {**now, "accepted": True, "message": "drain started; `spotguard status` follows it to the end"}

    _report(run_async(start))


def undrain(config: ConfigOpt = None,
            force: Annotated[bool, typer.Option("--force", help="Serve again even while a cloud notice is live.")] = False) -> None:
    """Return to serving after a manual drain."""
    from spotguard.control import client

    cfg = load_config(config)
    _report(run_async(lambda: client.undrain(cfg.control.socket, force=force)))
