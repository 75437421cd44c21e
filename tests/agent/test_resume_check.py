"""doctor's resume check: off said clearly, a key others can read, a holder no other gate can reach."""

from __future__ import annotations

import os
from pathlib import Path

from spotguard.config import Config, load
from spotguard.preflight import resume_check


def _config(tmp_path: Path, listen: str = "0.0.0.0:8001", **resume: object) -> Config:
    return load(None, environ={}, overrides={"gate": {"listen": listen, "upstream": "http://127.0.0.1:8000"},
                                             "resume": resume, "snapshot": {"url": f"file://{tmp_path}/s"}})


def test_resume_off_is_said_clearly_and_the_gate_off_means_no_check(tmp_path: Path) -> None:
    check = resume_check(_config(tmp_path))
    assert check is not None and check.level == "warning" and check.detail.startswith("off ([resume] key_file")
    assert resume_check(load(None, environ={})) is None


def test_a_private_key_and_a_reachable_holder_is_ok(tmp_path: Path) -> None:
    key = tmp_path / "resume.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    check = resume_check(_config(tmp_path, key_file=str(key), advertise="http://10.0.0.5:8001"))
    assert check is not None and check.level == "ok", check
    assert "http://10.0.0.5:8001" in check.detail and "index in file://" in check.detail


def test_problems_are_warnings_that_say_what_to_change(tmp_path: Path) -> None:
    key = tmp_path / "resume.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    check = resume_check(_config(tmp_path, "127.0.0.1:8001", key_file=str(key)))
    assert check is not None and check.level == "warning"
    assert "chmod 600" in check.detail and "[resume] advertise" in check.detail
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"short")
    check = resume_check(_config(tmp_path, key_file=str(bad)))
    assert check is not None and check.level == "error" and "[resume] key_file" in check.detail
