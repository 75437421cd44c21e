"""The one error the simulator raises for bad input: it names the file or option and what is wrong."""

from __future__ import annotations


class SimInputError(ValueError):
    """A trace, measurement or option the simulator cannot use; the message says which and why."""
