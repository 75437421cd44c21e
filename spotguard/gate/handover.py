"""What a gate tells the gate that takes an answer over: ``Spotguard-Continues``.

A continuation (``continuation.py``) is an ordinary OpenAI request, so any peer can answer it: an engine,
a load balancer, another node's gate. A gate of the same fleet (it has the resume key) that receives one
with a valid ``Spotguard-Continues`` header becomes the answer's holder: it joins its engine's output onto
what the client already has (``stitch.StreamStitch``, as the cutting gate would), puts its own cursors on
the events (numbered on from ``base``), holds them for resuming, and says so (``Spotguard-Holder`` and
``Spotguard-Resumed`` on its answer). The cutting gate then relays those events as they are.

The header is small (no user text: the output so far is in the continuation body itself) and signed with
the fleet's resume key, so a client cannot make a gate hold an answer under someone else's request::

    Spotguard-Continues: base64url(JSON) "." base64url(tag)

JSON: ``fingerprint`` (the original request's, ``cursor.request_fingerprint``), ``base`` (events the client
has), ``tokens`` (output tokens it has: the stitched usage counts them), ``prefix_chars`` (length of the
output so far at the end of the continuation's last message or prompt), ``stream`` (the client asked for
a stream), ``chat``, and the identity the client saw (``id``, ``created``, ``model``, ``object``,
``role_sent``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spotguard.gate.cursor import CursorKey
from spotguard.gate.stitch import AnswerIdentity
from spotguard.resume_names import FINGERPRINT

if TYPE_CHECKING:
    from spotguard.gate.output import OutputParser
    from spotguard.gate.stamp import Stamp

CONTINUES_HEADER = b"spotguard-continues"
_PURPOSE = b"continues"
MAX_HEADER = 2048


@dataclass(frozen=True, kw_only=True)
class Continues:
    """An answer another gate began: where the client is in it."""

    fingerprint: str
    base: int
    """Events the client has (the next event's offset is ``base + 1``)."""
    tokens: int
    prefix_chars: int
    stream: bool
    chat: bool
    identity: AnswerIdentity
    role_sent: bool

    @classmethod
    def of(cls, stamp: Stamp, parser: OutputParser, *, before: Continues | None, prefix: str,
           chat: bool) -> Continues:
        """Where the client of the answer ``stamp`` holds is, to hand it over: what this gate produced
        (``parser``), on top of what it was handed itself (``before``, ``prefix``) if it continued it."""
        return cls(fingerprint=stamp.answer.fingerprint, base=stamp.offset,
                   tokens=(before.tokens if before is not None else 0) + parser.content_events,
                   prefix_chars=len(prefix + parser.text), stream=stamp.answer.origin.stream, chat=chat,
                   identity=parser.identity or (before.identity if before is not None else AnswerIdentity()),
                   role_sent=parser.role_sent or (before is not None and before.role_sent))

    def prefix_of(self, body: dict[str, Any]) -> str:
        """The output so far, as the continuation ``body`` carries it (the end of its last message or prompt)."""
        if not self.prefix_chars:
            return ""
        if self.chat:
            messages = body.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages else None
            text = last.get("content") if isinstance(last, dict) else None
        else:
            text = body.get("prompt")
        return text[-self.prefix_chars:] if isinstance(text, str) else ""

    def to_header(self, key: CursorKey) -> bytes:
        ident = self.identity
        doc = {"fingerprint": self.fingerprint, "base": self.base, "tokens": self.tokens,
               "prefix_chars": self.prefix_chars, "stream": self.stream, "chat": self.chat, "id": ident.id,
               "created": ident.created, "model": ident.model, "object": ident.object, "role_sent": self.role_sent}
        payload = json.dumps(doc, separators=(",", ":")).encode()
        return _b64(payload) + b"." + _b64(key.tag(_PURPOSE, payload))

    @classmethod
    def from_header(cls, value: bytes, key: CursorKey) -> Continues | None:
        """The header's content when this fleet's key signed it; None otherwise (then the request is an
        ordinary one: nothing of it is trusted)."""
        if len(value) > MAX_HEADER:
            return None
        payload_b64, dot, tag_b64 = value.partition(b".")
        try:
            payload, tag = _unb64(payload_b64), _unb64(tag_b64)
        except (binascii.Error, ValueError):
            return None
        if not dot or not hmac.compare_digest(tag, key.tag(_PURPOSE, payload)):
            return None
        try:
            doc = json.loads(payload)
            ident = AnswerIdentity(id=_opt(doc, "id"), created=_int(doc.get("created")), model=_opt(doc, "model"),
                                   object=_opt(doc, "object"))
            found = cls(fingerprint=str(doc["fingerprint"]), base=int(doc["base"]), tokens=int(doc["tokens"]),
                        prefix_chars=int(doc["prefix_chars"]), stream=bool(doc["stream"]), chat=bool(doc["chat"]),
                        identity=ident, role_sent=bool(doc["role_sent"]))
        except (ValueError, TypeError, KeyError):
            return None
        if not FINGERPRINT.fullmatch(found.fingerprint) or min(found.base, found.tokens, found.prefix_chars) < 0:
            return None
        return found


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def _opt(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
