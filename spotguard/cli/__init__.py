"""The ``spotguard`` command line. Heavy imports happen inside commands so ``spotguard status`` stays quick.

Commands live by concern: ``node`` (run, gate, status, drain, undrain), ``tools`` (version, emulate,
demo, doctor, config show), ``snapshots`` (snapshots list/show/get, resume); ``common`` holds what they
share. This module puts them together, in the order ``--help`` lists them.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

import typer

from spotguard import __version__
from spotguard.cli import node, snapshots, tools
from spotguard.cli.common import PlainHelp
from spotguard.errors import SpotguardError

# A traceback must never print local variables: they hold the configuration (webhook URLs with tokens).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, cls=PlainHelp,
                  pretty_exceptions_show_locals=False,
                  help="Notices spot/preemptible evictions and drains the local inference server in time.")
config_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                         help="Inspect the configuration.")
snapshots_app = snapshots.snapshots_app
app.add_typer(config_app, name="config")
app.add_typer(snapshots_app, name="snapshots")
config_app.command("show")(tools.config_show)
for _command in (tools.version, node.run, node.gate, node.status, node.drain, node.undrain, tools.emulate,
                 tools.demo, tools.doctor, snapshots.resume):
    app.command()(_command)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spotguard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """spotguard: never miss an eviction, never overrun the window, lose no in-flight work."""


def main() -> None:
    try:
        app()
    except SpotguardError as exc:  # pragma: no cover - commands catch their own
        typer.echo(f"spotguard: {exc}", err=True)
        _exit(2)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            typer.echo(exc.code, err=True)
        _exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)


def _exit(code: int) -> NoReturn:
    """Leave without the interpreter's teardown, once everything is written and flushed.

    obstore 0.12's runtime threads can abort the process while Python finalises (SIGABRT, exit 134,
    seen in about one exit in three after any store call, with spotguard's code before this change
    too); the command's work and output are complete by then, so the exit code must not be lost to it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
