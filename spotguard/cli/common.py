"""What every ``spotguard`` command shares: plain help, the --config option, loading, running async calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from spotguard.errors import SpotguardError


class PlainHelp(TyperGroup):
    """Help that reads like a command line: a flag takes no value, a value option names its value.

    Typer's rich help prints a type after every option (``--dry-run <bool>``, ``--to <str>``), which
    reads as if a flag took a value; so help is plain (``rich_markup_mode=None``, inherited by every
    subcommand) and an option without an explicit ``metavar=`` shows its own name (``--to TO``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _name_values(self)


def _name_values(command: Any) -> None:
    for param in command.params:
        if param.param_type_name == "option" and param.metavar is None and not param.is_flag and not param.count:
            param.metavar = (param.name or "value").upper()
    for sub in getattr(command, "commands", {}).values():
        _name_values(sub)


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE", help="TOML config file "  # noqa: UP007
                                                    "(default $SPOTGUARD_CONFIG or /etc/spotguard/spotguard.toml).")]
UnauthOpt = Annotated[bool, typer.Option(
    "--allow-unauthenticated", help="With a key, read a snapshot whose manifest carries no MAC (format version 1, "
                                    "or written without a key): anyone who can write the store could have changed it.")]


T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"spotguard: {message}", err=True)
    raise typer.Exit(code)


def load_config(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    from spotguard import config

    try:
        return config.load(path, overrides=overrides)
    except SpotguardError as exc:
        fail(str(exc))


def run_async(call: Callable[[], Awaitable[T]], *, backend_options: dict[str, Any] | None = None) -> T:
    """Run an async call to completion (``backend_options`` as ``anyio.run`` takes them: uvloop); a
    SpotguardError becomes a one-line message and exit 1."""
    import anyio

    try:
        return anyio.run(call, backend="asyncio", backend_options=backend_options)
    except SpotguardError as exc:
        fail(str(exc), 1)
