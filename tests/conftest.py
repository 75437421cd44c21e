"""Loads every fixture module under tests/support as a pytest plugin (one module per area)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"tests.support.{path.stem}" for path in (Path(__file__).parent / "support").glob("*.py")
    if path.stem != "__init__"
)
