"""The metadata emulator: AWS, GCP and Azure instance metadata with a control API and fault injection.

``spotguard emulate`` serves it for failover rehearsals; tests, the demo and benchmarks point the
daemon's metadata URLs at it and drive notices through ``EmulatorControl``.
"""

from __future__ import annotations

from spotguard.emulator.app import EmulatorApp, run_emulator
from spotguard.emulator.control import EmulatorControl
from spotguard.emulator.instance import EmulatedInstance

__all__ = ["EmulatedInstance", "EmulatorApp", "EmulatorControl", "run_emulator"]
