"""spotguard: notices a spot/preemptible eviction and drains the local inference server in time."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
