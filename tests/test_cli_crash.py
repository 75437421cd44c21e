"""A crash of the real ``spotguard`` command never prints configuration values (tokens in webhook URLs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spotguard import cli

TOKEN = "T0KEN-s3cr3t-4242"

# The real CLI in a real process, with the daemon replaced by one that fails unexpectedly: the traceback
# then runs through ``run``, whose locals hold the loaded configuration.
CRASH = """
import sys
import spotguard.agent.daemon as daemon
import spotguard.cli as cli

async def crash(config):
    raise RuntimeError("unexpected failure")

daemon.run_daemon = crash
sys.argv = ["spotguard", "run", "--config", sys.argv[1]]
cli.main()
"""


def test_a_crash_with_a_token_in_the_config_does_not_print_the_token(tmp_path: Path) -> None:
    config = tmp_path / "spotguard.toml"
    config.write_text(f'[agent]\ncloud = "none"\n[webhook]\nurls = ["https://hooks.example.com/services/{TOKEN}"]\n')
    done = subprocess.run([sys.executable, "-c", CRASH, str(config)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "RuntimeError: unexpected failure" in output  # it did crash, with a traceback
    assert TOKEN not in output


def test_no_typer_app_shows_locals() -> None:
    for app in (cli.app, cli.config_app, cli.snapshots_app):
        assert app.pretty_exceptions_show_locals is False
