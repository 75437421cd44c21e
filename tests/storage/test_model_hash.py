"""The model digest: cached by path, size and mtime, worked out in the background, never at start-up."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import pytest
import structlog

from spotguard.config import Config, load
from spotguard.storage import model_hash
from spotguard.storage.snapshot import prepare

pytestmark = pytest.mark.anyio


def _config(tmp_path: Path, model: Path) -> Config:
    return load(None, environ={}, overrides={
        "agent": {"state_dir": str(tmp_path / "state")},
        "server": {"kind": "llamacpp", "url": "http://127.0.0.1:1"},
        "snapshot": {"url": f"file://{tmp_path / 'store'}", "model_path": str(model)}})


async def test_the_first_start_hashes_in_the_background_and_later_starts_reuse_it(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(3 << 20))
    (tmp_path / "store").mkdir()
    want = hashlib.sha256(model.read_bytes()).hexdigest()
    config = _config(tmp_path, model)
    first = await prepare(config)
    assert first.prepared.model_sha256 == ""  # not known yet: start-up did not wait for it
    with anyio.fail_after(30):
        await first.stamp_model(structlog.get_logger("test"))
    assert first.prepared.model_sha256 == want
    second = await prepare(config)
    assert second.prepared.model_sha256 == want  # cached: no hashing at all
    model.write_bytes(os.urandom(3 << 20))  # a new model under the same path
    assert model_hash.cached_sha256(str(model), tmp_path / "state") == ""
