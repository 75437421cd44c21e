"""The Unix control socket: ``POST /drain``, ``POST /undrain``, ``GET /status`` (server and client).

Access is the socket file's permissions (``[control] mode`` and ``group``); it never listens on TCP.
"""

from spotguard.control.controller import ControlConflict, Controller, DrainRequest, UndrainRequest

__all__ = ["ControlConflict", "Controller", "DrainRequest", "UndrainRequest"]
