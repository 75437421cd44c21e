"""A real llama-server on loopback, running a tiny offline model (tests marked ``llama``).

The binary comes from ``tools/build-llama-server.sh`` (cached outside the repo; the Makefile builds it
before the tests). Without it the tests that need it are skipped with a message saying so.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support._processes import stop

LLAMA_VERSION = "0.3.36"
VOCAB_NAME = "ggml-vocab-llama-spm.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]


def llama_cache_dir() -> Path:
    cache = Path(os.environ.get("SPOTGUARD_CACHE", Path.home() / ".cache" / "spotguard"))
    return cache / f"llama-server-{LLAMA_VERSION}"


def find_llama_server() -> Path | None:
    """``$SPOTGUARD_LLAMA_SERVER``, else the finished build in the cache; None when neither exists."""
    explicit = os.environ.get("SPOTGUARD_LLAMA_SERVER")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    cached = llama_cache_dir()
    binary = cached / "llama-server"
    return binary if (cached / ".complete").is_file() and binary.is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LlamaServer:
    """One running llama-server process."""

    url: str
    port: int
    slots: int
    ctx: int
    slot_save_path: Path | None
    log: Path
    proc: subprocess.Popen[bytes]


@contextmanager
def run_llama_server(binary: Path, model: Path, workdir: Path, *, slots: int = 2, ctx: int = 8192,
                     slot_save_path: Path | None = None, extra_args: tuple[str, ...] = (),
                     start_timeout: float = 30.0) -> Iterator[LlamaServer]:
    """Start llama-server on a free loopback port, wait for /health 200 (bounded), stop it after."""
    port = _free_port()
    log = workdir / f"llama-server-{port}.log"
    args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(ctx), "-t", "1", "-tb", "1", "--no-warmup", *extra_args]
    if slot_save_path is not None:
        slot_save_path.mkdir(parents=True, exist_ok=True)  # the server exits if it is missing
        args += ["--slot-save-path", str(slot_save_path)]
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become healthy; see {log}")
            time.sleep(0.05)  # bounded by the deadline above: process start-up, not a test wait
        yield LlamaServer(url=url, port=port, slots=slots, ctx=ctx, slot_save_path=slot_save_path, log=log,
                          proc=proc)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    """Path of the llama-server binary; skips the test when it has not been built."""
    binary = find_llama_server()
    if binary is None:
        pytest.skip(f"llama-server not built: run tools/build-llama-server.sh (caches it in {llama_cache_dir()}) "
                    "or set SPOTGUARD_LLAMA_SERVER")
    return binary


@pytest.fixture(scope="session")
def tiny_model(llama_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic tiny llama GGUF (tools/make_tiny_model.py), written once per session."""
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocab = llama_binary.parent / VOCAB_NAME
    if not vocab.is_file():
        pytest.skip(f"{vocab} missing: re-run tools/build-llama-server.sh")
    out = tmp_path_factory.mktemp("model") / "tiny-llama.gguf"
    path: Path = module.write_tiny_model(out, vocab)
    return path


@pytest.fixture
def llama_server_factory(llama_binary: Path, tiny_model: Path,
                         tmp_path: Path) -> Iterator[Callable[..., LlamaServer]]:
    """Starts llama-servers with the tiny model (``slots``, ``ctx``, ``slot_save_path``, ``extra_args``);
    all are stopped at the end of the test."""
    with ExitStack() as stack:
        def start(**kwargs: Any) -> LlamaServer:
            return stack.enter_context(run_llama_server(llama_binary, tiny_model, tmp_path, **kwargs))

        yield start


@pytest.fixture
def llama_server(llama_server_factory: Callable[..., LlamaServer], tmp_path: Path) -> LlamaServer:
    """A llama-server with 2 slots and a slot-save directory, for one test."""
    return llama_server_factory(slots=2, ctx=8192, slot_save_path=tmp_path / "slots")
