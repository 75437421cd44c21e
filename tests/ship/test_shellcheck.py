"""shellcheck passes on the shipped shell scripts."""

from __future__ import annotations

import subprocess

import pytest

from tests.ship.conftest import REPO, need_tool

SCRIPTS = sorted([*REPO.glob("packer/scripts/*.sh"), REPO / "tools" / "setup-test-tools.sh",
                  REPO / "tools" / "setup-bench-tools.sh"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script: object) -> None:
    tool = need_tool("shellcheck")
    done = subprocess.run([tool, "--severity=style", "--shell=sh", str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
