"""Loads every fixture module under tests/support as a pytest plugin (one module per area).

Modules whose name starts with ``_`` are plain helpers the fixture modules import, not plugins.
"""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"tests.support.{path.stem}" for path in (Path(__file__).parent / "support").glob("*.py")
    if not path.stem.startswith("_")
)
