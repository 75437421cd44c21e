"""The demo's inference engines: llama-server (the project's build, a tiny offline model) or the stand-in.

The build is ``tools/build-llama-server.sh`` (cached in ``$SPOTGUARD_CACHE``); the first run builds it and
says so while it runs. When it cannot be built or the tiny model cannot be written, the demo says why and
runs the stand-in instead.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from spotguard.demo.processes import Processes, free_port, wait_http

LLAMA_VERSION = "0.3.36"
VOCAB_NAME = "ggml-vocab-llama-spm.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build-llama-server.sh"
MODEL_SCRIPT = REPO_ROOT / "tools" / "make_tiny_model.py"
HEARTBEAT = 30.0
"""Seconds between "still building" lines."""


@dataclass(frozen=True)
class Engine:
    kind: str
    """``llama-server`` or ``stand-in``."""
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    slots: Path | None = None
    model: Path | None = None


@dataclass(frozen=True)
class EngineChoice:
    """What the demo will run: the llama-server binary and model, or None and why not."""

    binary: Path | None
    model: Path | None
    why_not: str = ""


def _cache() -> Path:
    return Path(os.environ.get("SPOTGUARD_CACHE", Path.home() / ".cache" / "spotguard")) / f"llama-server-{LLAMA_VERSION}"


def cached_binary() -> Path | None:
    explicit = os.environ.get("SPOTGUARD_LLAMA_SERVER")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    binary = _cache() / "llama-server"
    return binary if (_cache() / ".complete").is_file() and binary.is_file() else None


async def _build(logs: Path, say: Callable[[str], None]) -> Path | None:
    log = logs / "llama-server-build.log"
    say(f"building llama-server {LLAMA_VERSION} from llama.cpp's sources, once (cached in {_cache()}): the demo "
        f"runs a real inference engine. About 5-11 minutes on 2 cores; log: {log}")
    began = time.monotonic()
    with open(log, "ab") as out:
        proc = await anyio.open_process(["bash", str(BUILD_SCRIPT)], stdout=out, stderr=out,
                                        start_new_session=True)
    try:
        while proc.returncode is None:
            with anyio.move_on_after(HEARTBEAT):
                await proc.wait()
            if proc.returncode is None:
                say(f"  ... still building llama-server ({(time.monotonic() - began) / 60:.1f} min so far)")
    finally:
        if proc.returncode is None:  # interrupted: the whole build goes (bash, cmake, the compilers)
            with anyio.CancelScope(shield=True):
                await _stop_build(proc.pid)
                await proc.wait()
    if proc.returncode != 0:
        return None
    say(f"  built in {(time.monotonic() - began) / 60:.1f} min")
    return cached_binary()


async def _stop_build(pgid: int) -> None:
    """SIGTERM the build's process group first: ninja then stops the compilers it runs in process groups of
    their own (a SIGKILL would leave them running); SIGKILL whatever is left after a few seconds."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        with anyio.move_on_after(wait):
            while True:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                await anyio.sleep(0.1)


async def choose(workdir: Path, logs: Path, say: Callable[[str], None], *, build: bool = True,
                 want_llama: bool = True) -> EngineChoice:
    """Find (or build) llama-server and write the tiny model; the reason when that is impossible."""
    if not want_llama:
        return EngineChoice(None, None, "--stand-in was given")
    binary = cached_binary()
    if binary is None and build and BUILD_SCRIPT.is_file():
        binary = await _build(logs, say)
        if binary is None:
            return EngineChoice(None, None, f"the llama-server build failed (see {logs / 'llama-server-build.log'})")
    if binary is None:
        return EngineChoice(None, None, "no llama-server build (run tools/build-llama-server.sh or set "
                                        "SPOTGUARD_LLAMA_SERVER)")
    vocab = binary.parent / VOCAB_NAME
    try:
        model = await anyio.to_thread.run_sync(_write_model, workdir / "tiny-llama.gguf", vocab)
    except Exception as exc:  # noqa: BLE001 - any failure here means: run the stand-in, and say why
        return EngineChoice(None, None, f"the tiny model could not be written ({type(exc).__name__}: {exc})")
    return EngineChoice(binary, model)


def _write_model(out: Path, vocab: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_model", MODEL_SCRIPT)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(MODEL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path: Path = module.write_tiny_model(out, vocab)
    return path


async def start_engine(procs: Processes, choice: EngineChoice, name: str, workdir: Path) -> Engine:
    """One replica on a free loopback port, healthy before this returns."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = procs.logs / f"{name}.log"
    if choice.binary is None or choice.model is None:
        proc = procs.start(name, [sys.executable, "-m", "spotguard.demo.standin", str(port)])
        await wait_http(url + "/health", proc, f"stand-in engine {name}", log, timeout=30)
        return Engine("stand-in", url, proc, log)
    slots = workdir / f"{name}-slots"
    slots.mkdir(parents=True, exist_ok=True)
    # 4 slots of 16k tokens: room for long answers; one thread each, the machine may have two cores.
    args = [str(choice.binary), "-m", str(choice.model), "--host", "127.0.0.1", "--port", str(port),
            "-np", "4", "-c", "65536", "-t", "1", "-tb", "1", "--no-warmup", "--metrics",
            "--slot-save-path", str(slots)]
    proc = procs.start(name, args, env={**os.environ, "LD_LIBRARY_PATH": str(choice.binary.parent)})
    await wait_http(url + "/health", proc, f"llama-server {name}", log, timeout=60)
    return Engine("llama-server", url, proc, log, slots, choice.model)
