"""Shipping fixtures: a spotguard wheel built from this checkout, and an install into a temporary root."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "packer" / "scripts" / "install-spotguard.sh"
SYSTEMD_DIR = REPO / "systemd"
HOST_UNITS = Path("/lib/systemd/system")


@dataclass(frozen=True)
class Installed:
    root: Path
    log: str


PACKAGES = {"systemd-analyze": "systemd", "systemd-nspawn": "systemd-container", "shellcheck": "shellcheck"}


def need_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed; run tools/setup-test-tools.sh "
                    f"(apt-get install {PACKAGES.get(name, name)})")
    return found


def unit_root(root: Path) -> Path:
    """Gives ``root`` the stock units verify resolves against (sysinit.target, network-online.target...)."""
    if not HOST_UNITS.is_dir():
        pytest.skip(f"{HOST_UNITS} is missing: the systemd package provides the stock units verify needs")
    target = root / "usr" / "lib" / "systemd" / "system"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(HOST_UNITS, target, symlinks=True)
    return root


@pytest.fixture(scope="session")
def spotguard_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built from a copy so the shared tree gets no build/ or egg-info."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "spotguard", src / "spotguard", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(src), "-w",
                           str(work / "dist")], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"pip wheel failed on this checkout:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    return next((work / "dist").glob("spotguard-*.whl"))


def system_python() -> str:
    """/usr/bin/python3 when it is 3.11+ with venv: a venv on it also runs in a container that sees only /usr."""
    candidate = "/usr/bin/python3"
    probe = "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"
    try:
        ok = subprocess.run([candidate, "-c", probe], capture_output=True, timeout=30, check=False).returncode == 0
    except OSError:
        ok = False
    return candidate if ok else sys.executable


@pytest.fixture(scope="session")
def installed(spotguard_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """install-spotguard.sh run for real into a temporary root (pip resolves dependencies from the index)."""
    root = tmp_path_factory.mktemp("root")
    done = subprocess.run(["sh", str(INSTALL_SCRIPT), "--wheel", str(spotguard_wheel), "--inference-unit", "vllm",
                           "--root", str(root), "--python", system_python(), "--no-enable"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"install-spotguard.sh failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    return Installed(root=root, log=done.stdout + done.stderr)
