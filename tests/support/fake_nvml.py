"""A fake ``libnvidia-ml.so.1`` built from tests/gpu/fake_nvml.c, so tests drive the real pynvml binding.

pynvml opens the library with ``CDLL("libnvidia-ml.so.1")`` on the first ``nvmlInit`` and keeps it for
the life of the process, and the loader reads ``LD_LIBRARY_PATH`` only at process start: each run
therefore happens in a fresh Python subprocess (:func:`run_python`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "gpu" / "fake_nvml.c"


@dataclass(frozen=True)
class FakeNvml:
    libdir: Path
    """Directory holding libnvidia-ml.so.1 (put it on LD_LIBRARY_PATH)."""

    def run_python(self, code: str, env: Mapping[str, str] | None = None, *,
                   with_library: bool = True, timeout: float = 60) -> Any:
        """Runs ``code`` in a new interpreter and returns the JSON it prints on its last line."""
        return run_python(code, env, libdir=self.libdir if with_library else None, timeout=timeout)


def run_python(code: str, env: Mapping[str, str] | None = None, *, libdir: Path | None,
               timeout: float = 60) -> Any:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML_")}
    full_env.pop("LD_LIBRARY_PATH", None)
    if libdir is not None:
        full_env["LD_LIBRARY_PATH"] = str(libdir)
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"subprocess failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> FakeNvml:
    """Compiles the fake NVML library once per session (needs gcc)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build the fake libnvidia-ml.so.1: apt-get install gcc")
    libdir = tmp_path_factory.mktemp("fake-nvml")
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", str(libdir / "libnvidia-ml.so.1"), str(SOURCE)],
                   check=True, capture_output=True, timeout=60)
    return FakeNvml(libdir)
