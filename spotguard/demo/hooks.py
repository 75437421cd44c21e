"""A local webhook receiver: records each JSON body the daemon POSTs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from spotguard.asgi import Receive, Scope, Send, read_body, respond


@dataclass
class Receiver:
    bodies: list[Any] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        try:
            self.bodies.append(json.loads(raw))
        except ValueError:
            self.bodies.append(raw.decode(errors="replace"))
        await respond(send, 200, "ok")

    def texts(self) -> list[str]:
        return [str(b.get("text", b)) if isinstance(b, dict) else str(b) for b in self.bodies]
