"""``spotguard ... --help`` as a newcomer reads it: flags take no value, value options name theirs."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.testing import CliRunner

from spotguard.cli import app

TYPE_PLACEHOLDER = re.compile(r"<(bool|str|int|float|path|text)>", re.IGNORECASE)


def commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under a group (Typer's groups may not be click's own classes: duck-typed)."""
    found = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def test_every_help_page_names_values_and_shows_no_type_placeholders() -> None:
    root = typer.main.get_command(app)
    runner = CliRunner()
    pages = commands(root)
    assert ("drain",) in pages and ("snapshots", "get") in pages
    for path in pages:
        result = runner.invoke(app, [*path, "--help"], terminal_width=100)
        assert result.exit_code == 0, (path, result.output)
        options = [line.strip() for line in result.output.splitlines() if line.strip().startswith("-")]
        for line in options:
            assert not TYPE_PLACEHOLDER.search(line), (path, line)
        flags = {line.split()[0] for line in options}
        assert "--help" in flags
        help_line = next(line for line in options if line.startswith("--help"))
        assert help_line.split()[1] == "Show", (path, help_line)  # a flag: no placeholder after it
    drain = runner.invoke(app, ["drain", "--help"], terminal_width=100).output
    assert re.search(r"--reason TEXT\b", drain) and re.search(r"--deadline SECONDS\b", drain)
    assert re.search(r"--dry-run\s+Show what", drain)
