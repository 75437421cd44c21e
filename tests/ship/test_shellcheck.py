"""shellcheck passes on the shipped shell scripts."""

from __future__ import annotations

import subprocess

import pytest

from tests.ship.conftest import REPO, need_tool

SCRIPTS = sorted([*REPO.glob("packer/scripts/*.sh"), REPO / "tools" / "setup-test-tools.sh",
                  REPO / "tools" / "setup-bench-tools.sh", REPO / "tools" / "apt-install.sh"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script: object) -> None:
    tool = need_tool("shellcheck")
    # -x with the repository as the working directory: the tool scripts source tools/apt-install.sh.
    done = subprocess.run([tool, "-x", "--severity=style", "--shell=sh", str(script)], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
