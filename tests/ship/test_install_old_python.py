"""install-spotguard.sh on a distribution whose python3 is older than 3.11 (Debian 11: 3.9), under systemd-nspawn.

The root file system comes from Debian's archive (tools/build-rootfs.sh, cached outside the repo) with the
distribution's python3 and python3-venv, so the installer's "no suitable Python" path runs for real: it
looks for python3.1x, asks apt for one, finds none, and stops before touching anything.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.ship.conftest import INSTALL_SCRIPT, REPO, SYSTEMD_DIR, need_tool


@pytest.fixture(scope="module")
def bullseye() -> Path:
    need_tool("systemd-nspawn")
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn and debootstrap need root")
    done = subprocess.run(["bash", str(REPO / "tools" / "build-rootfs.sh"), "bullseye"], capture_output=True,
                          text=True, timeout=900, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot build the Debian 11 root file system: {done.stderr.strip()[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def install_in(root: Path, *args: str) -> tuple[int, str]:
    """The installer inside ``root``: (exit code, its output). Changes land in a throw-away overlay, so
    the cached tree stays clean; nspawn hands the container's stdout and stderr back as one stream."""
    command = ["systemd-nspawn", "--quiet", f"--directory={root}", "--volatile=overlay", "--register=no",
               "--keep-unit", f"--machine=sg-{uuid.uuid4().hex[:12]}",
               f"--bind-ro={INSTALL_SCRIPT.parent}:/src/scripts", f"--bind-ro={SYSTEMD_DIR}:/src/systemd",
               "--", "/bin/sh", "/src/scripts/install-spotguard.sh", "--version", "0.1.0",
               "--systemd-dir", "/src/systemd", *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          check=False, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout


def test_the_root_file_system_really_has_an_old_python(bullseye: Path) -> None:
    done = subprocess.run(["chroot", str(bullseye), "python3", "-c", "import sys, venv, ensurepip; "
                           "print(sys.version_info[:2])"], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "(3, 9)", done.stderr


def test_no_suitable_python_stops_before_anything_is_installed(bullseye: Path) -> None:
    code, out = install_in(bullseye)
    assert code == 2, out
    assert "no Python 3.11+ with venv (python3: Python 3.9" in out
    # It asked the distribution (apt) for python3.11-3.13 and found none in Debian 11's lists.
    assert "package lists have no python3.11, 3.12 or 3.13" in out
    assert "virtualenv" not in out


def test_an_old_python_given_explicitly_is_refused(bullseye: Path) -> None:
    code, out = install_in(bullseye, "--python", "/usr/bin/python3")
    assert code == 2, out
    assert "--python /usr/bin/python3 (Python 3.9.2): Python 3.11 or newer with venv is needed" in out
    code, out = install_in(bullseye, "--no-install-python")
    assert code == 2 and "--no-install-python" in out, out
    assert "deb.debian.org" not in out  # it did not reach for the package manager
