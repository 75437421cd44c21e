"""The commands around the daemon: version, emulate, demo, doctor, config show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from spotguard import __version__
from spotguard.cli.common import ConfigOpt, fail, load_config


def version(config: ConfigOpt = None) -> None:
    """Print the version."""
    typer.echo(f"spotguard {__version__}")


def emulate(config: ConfigOpt = None,
            listen: Annotated[str, typer.Option(metavar="HOST:PORT", help="Where to serve AWS, GCP and Azure metadata.")] = "127.0.0.1:8169") -> None:
    """Serve emulated AWS/GCP/Azure metadata with a control API, to rehearse evictions."""
    import anyio

    from spotguard import logs
    from spotguard.config import parse_listen
    from spotguard.emulator.app import run_emulator

    cfg = load_config(config)
    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    host, port = parse_listen(listen, "--listen")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(lambda task_status: run_emulator(host, port, task_status=task_status))
            typer.echo(f"emulating AWS, GCP and Azure metadata on {bound.url} (control API: {bound.url}/_emulator/)")

    try:
        anyio.run(main, backend="asyncio")
    except KeyboardInterrupt:
        pass


def demo(short: Annotated[bool, typer.Option("--short", help="Fewer, shorter requests and a 10 s notice.")] = False,
         stand_in: Annotated[bool, typer.Option("--stand-in", help="Run the stand-in engine, not llama-server.")] = False,
         no_build: Annotated[bool, typer.Option("--no-build", help="Do not build llama-server when it is not "
                                                "cached (the stand-in runs instead).")] = False,
         workdir: Annotated[Path | None, typer.Option(  # noqa: UP007
             "--workdir", metavar="DIR", help="Where the config, logs, snapshots and picture go "
                                              "(default: a new directory under /tmp).")] = None) -> None:
    """Run a spot eviction on this machine with real parts and no cloud, and show what spotguard did."""
    from spotguard.demo import Options, run_demo

    try:
        run_demo(Options(short=short, llama=not stand_in, build=not no_build, workdir=workdir))
    except KeyboardInterrupt:
        fail("demo interrupted; every process it started was stopped", 130)
    except Exception as exc:  # noqa: BLE001 - the demo's processes are stopped; say what failed, in one line
        fail(f"demo failed: {exc}", 1)


def doctor(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False) -> None:
    """Check the detected cloud, metadata reachability, configuration, NVML and the install."""
    import anyio

    from spotguard.checks import format_checks
    from spotguard.doctor import run_checks

    cfg = load_config(config)
    checks = anyio.run(run_checks, cfg, backend="asyncio")
    if as_json:
        typer.echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        typer.echo(format_checks(checks))
    raise typer.Exit(1 if any(c.level == "error" for c in checks) else 0)


def config_show(config: ConfigOpt = None,
                doc: Annotated[bool, typer.Option("--doc", help="Print every key with its default and help.")] = False) -> None:
    """Print the effective configuration (file -> environment -> flags) as TOML."""
    from spotguard import config as config_module

    if doc:
        for section, key, kind, default, help_text in config_module.reference():
            typer.echo(f"[{section}] {key} ({kind}, default {default}): {help_text}")
        return
    typer.echo(config_module.to_toml(load_config(config)))
