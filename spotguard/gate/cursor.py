"""Resume cursors: which gate holds an answer and how far a client got, signed with the fleet's key.

A cursor rides in the ``id:`` line of every SSE event a gate sends, and in the ``Spotguard-Resume`` header
of a cut non-streaming answer. Its wire form is ASCII letters, digits, ``-``, ``_`` and one ``.`` (nothing
an SSE ``id:`` line or an HTTP header refuses: no NUL, CR, LF, space, comma or colon)::

    cursor = token "." offset                       offset: decimal, events the client has had
    token  = base64url, unpadded, of
             version (1 byte) | expires (u32, big endian, unix seconds) | len(answer id) (1 byte)
             | answer id | holder (the holder gate's base URL) | mac (16 bytes)
    mac    = HMAC-SHA256(cursor key, "spotguard-cursor/1" | the bytes before the mac | fingerprint)[:16]
    fingerprint = request_fingerprint(Authorization, body): HMAC-SHA256 under a second key, 32 hex digits

Both keys (and the one that authenticates answer index objects) come from ``[resume] key_file``
through HKDF-SHA256 with different ``info``. Through the fingerprint a token is bound to one request
body and one Authorization: with another of either, another key, after ``expires``, or with one bit
changed, ``verify`` refuses it. About 85 characters with a holder such as ``http://10.0.0.5:8001``.

The offset is outside the MAC, so a gate signs once per answer (``issue``, a few microseconds) and each
event's cursor is one string concatenation (``Signed.at``). That is safe: the offset only says where to
start replaying the same answer, which the same requester may read whole anyway. A smaller offset replays
events the client already had; one past what the holder has is refused there (``held.py``).

The holder is readable by whoever holds the cursor (base64, not encrypted): clients learn the internal
address of the gate that holds their answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spotguard.errors import ConfigError, ResumeRefused
from spotguard.resume_names import ANSWER_ID, holder_problem

VERSION = 1
MAC_BYTES = 16
MAX_CURSOR = 512
"""Longest cursor ``verify`` looks at: anything longer is refused unread."""
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_OFFSET = re.compile(r"[0-9]{1,12}")
_HEAD = struct.Struct(">BIB")
_CONTEXT = b"spotguard-cursor/1"
_REQUEST = b"spotguard-request/1"
_WILDCARD = ("", "0.0.0.0", "::")


def new_answer_id() -> str:
    """A fleet-unique answer id: 96 random bits as 16 URL-safe characters."""
    return secrets.token_urlsafe(12)


def advertised_holder(advertise: str, gate_listen: str, private_ip: str = "") -> str:
    """The base URL other gates reach this gate on: ``[resume] advertise``; else, when the gate listens on
    every address, the VM's private IP; else the ``[gate] listen`` host (a gate bound to one address is
    reachable only there), with the gate's port. Empty when none is known (``spotguard doctor`` says so)."""
    if advertise:
        return advertise.rstrip("/")
    if not gate_listen:
        return ""
    host, _, port = gate_listen.rpartition(":")
    host = host.strip("[]")
    if host in _WILDCARD:
        host = private_ip
        if not host:
            return ""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _read_secret(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"[resume] key_file {path!r} cannot be read: {exc.strerror}") from None
    if len(data) == 32:
        return data
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    raise ConfigError(f"[resume] key_file {path!r}: expected 32 raw bytes or 64 hex characters, got {len(data)} "
                      f"bytes (make one with: head -c 32 /dev/urandom > FILE, and copy it to every node)")


def _derive(raw: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"spotguard resume v1: " + purpose).derive(raw)


def _as_bytes(value: bytes | str | None) -> bytes:
    if value is None:
        return b""
    return value.encode("latin-1", "replace") if isinstance(value, str) else value


@dataclass(frozen=True)
class Cursor:
    """A verified cursor: which gate holds the answer, which answer, and how many events the client had."""

    holder: str
    answer_id: str
    offset: int
    expires: int


@dataclass(frozen=True)
class Signed:
    """One answer's signed token; ``at(offset)`` is the cursor of the event after ``offset`` events."""

    holder: str
    answer_id: str
    expires: int
    fingerprint: str
    prefix: str = field(repr=False)
    """``token + "."``: the signed part, computed once."""

    def at(self, offset: int) -> str:
        return self.prefix + str(offset)


@dataclass(frozen=True)
class CursorKey:
    """The fleet's resume key, split by HKDF into the cursor MAC key and the request fingerprint key."""

    _mac: bytes = field(repr=False)
    _fingerprint: bytes = field(repr=False)
    index_key: bytes = field(repr=False)
    """The key that authenticates answer index objects (``storage/answer_index.py``)."""
    key_id: str
    """Names the key without revealing it (for ``spotguard doctor`` and logs)."""

    @classmethod
    def from_bytes(cls, raw: bytes) -> CursorKey:
        if len(raw) != 32:
            raise ConfigError(f"[resume] key_file: expected 32 bytes, got {len(raw)}")
        return cls(_derive(raw, b"cursor mac"), _derive(raw, b"request fingerprint"), _derive(raw, b"answer index"),
                   hashlib.sha256(b"spotguard-resume-key\x00" + raw).hexdigest()[:16])

    @classmethod
    def load(cls, path: str) -> CursorKey:
        """Read ``[resume] key_file``: 32 raw bytes or 64 hex characters; ConfigError naming the key if not."""
        return cls.from_bytes(_read_secret(path))

    def fingerprint(self, auth: bytes | str | None, body: bytes) -> str:
        """See ``request_fingerprint``."""
        secret = _as_bytes(auth)
        mac = hmac.new(self._fingerprint, _REQUEST + struct.pack(">I", len(secret)) + secret, hashlib.sha256)
        mac.update(body)
        return mac.hexdigest()[:32]

    def tag(self, purpose: bytes, data: bytes) -> bytes:
        """A 16-byte MAC of ``data`` for ``purpose`` (another message than a cursor's: the context differs)."""
        return hmac.new(self._mac, b"spotguard-tag/1\x00" + purpose + b"\x00" + data, hashlib.sha256).digest()[:MAC_BYTES]

    def _mac_of(self, signed: bytes, fingerprint: str) -> bytes:
        return hmac.new(self._mac, _CONTEXT + signed + fingerprint.encode("ascii"), hashlib.sha256).digest()[:MAC_BYTES]

    def issue(self, holder: str, answer_id: str, *, fingerprint: str, expires: float) -> Signed:
        """Sign (holder, answer id) for the request with ``fingerprint``, valid until ``expires`` (unix s)."""
        holder = holder.rstrip("/")
        why = holder_problem(holder)
        if why:
            raise ValueError(f"holder {holder!r} {why}")
        if not ANSWER_ID.fullmatch(answer_id):
            raise ValueError(f"answer id {answer_id!r} is not 8-64 of [A-Za-z0-9_-]")
        until = int(expires)
        signed = _HEAD.pack(VERSION, until, len(answer_id)) + answer_id.encode("ascii") + holder.encode("ascii")
        token = base64.urlsafe_b64encode(signed + self._mac_of(signed, fingerprint)).rstrip(b"=").decode("ascii")
        return Signed(holder, answer_id, until, fingerprint, token + ".")

    def verify(self, cursor: str, *, fingerprint: str, now: float) -> Cursor:
        """The cursor, when this key signed it for the request with ``fingerprint`` and it has not expired;
        else ``ResumeRefused`` with reason ``malformed``, ``mismatch`` (altered, another key, request or
        Authorization) or ``expired``."""
        if len(cursor) > MAX_CURSOR:
            raise ResumeRefused("malformed", "resume refused: the cursor is too long")
        token, dot, offset = cursor.rpartition(".")
        if not dot or not _OFFSET.fullmatch(offset) or not _TOKEN.fullmatch(token):
            raise ResumeRefused("malformed", "resume refused: not a cursor (token.offset)")
        try:
            data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise ResumeRefused("malformed", "resume refused: the cursor is not base64url") from None
        # Only the one encoding ``issue`` writes: unused low bits in the last character would otherwise let
        # several strings stand for the same token.
        if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != token:
            raise ResumeRefused("malformed", "resume refused: the cursor is not in canonical base64url")
        if len(data) < _HEAD.size + MAC_BYTES or data[0] != VERSION:
            raise ResumeRefused("malformed", "resume refused: not a cursor of this version")
        signed, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac_of(signed, fingerprint)):
            raise ResumeRefused("mismatch", "resume refused: the cursor was altered, or made with another key "
                                "or for another request or Authorization")
        _, until, id_length = _HEAD.unpack_from(signed)
        rest = signed[_HEAD.size:]
        answer_id = rest[:id_length].decode("ascii", "replace")
        holder = rest[id_length:].decode("ascii", "replace")
        # Signed by a gate of the fleet, so these hold; checked anyway before they reach a URL or a store key.
        if not ANSWER_ID.fullmatch(answer_id) or holder_problem(holder):
            raise ResumeRefused("malformed", "resume refused: the cursor names no valid answer or holder")
        if now >= until:
            raise ResumeRefused("expired", "resume refused: the cursor has expired ([resume] ttl)")
        return Cursor(holder, answer_id, int(offset), until)


def request_fingerprint(key: CursorKey, auth: bytes | str | None, body: bytes) -> str:
    """An HMAC (32 hex digits, not reversible without the fleet key) of the request's Authorization and body:
    how a retry without a cursor finds its answer, and the name of its index object. A missing
    Authorization counts as empty."""
    return key.fingerprint(auth, body)


class AnswerCursors:
    """The cursors of one answer's events: signed once, signed again when a tenth of the ttl has passed, so
    any cursor stays valid for at least ``ttl`` after the event it names, at one float compare per event."""

    __slots__ = ("_key", "_ttl", "_renew", "_renew_at", "signed")

    def __init__(self, key: CursorKey, holder: str, answer_id: str, *, fingerprint: str, ttl: float,
                 now: float) -> None:
        self._key = key
        self._ttl = ttl
        self._renew = ttl / 10
        self.signed = key.issue(holder, answer_id, fingerprint=fingerprint, expires=now + ttl + self._renew + 1)
        self._renew_at = now + self._renew

    def at(self, offset: int, now: float) -> str:
        """The cursor of the event after ``offset`` events; ``now`` is unix time (``time.time()``)."""
        if now >= self._renew_at:
            old = self.signed
            self.signed = self._key.issue(old.holder, old.answer_id, fingerprint=old.fingerprint,
                                          expires=now + self._ttl + self._renew + 1)
            self._renew_at = now + self._renew
        return self.signed.prefix + str(offset)
