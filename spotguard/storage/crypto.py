"""Optional client-side encryption of snapshot objects, and authentication of the manifest.

Two keys are derived from ``[snapshot] encryption_key_file`` with HKDF-SHA256 (different ``info``), so
the object key and the manifest key are never the same bytes:

- **objects** (format version 3): a framed AES-256-GCM stream, so a multi-GB KV file is sealed and
  opened a frame at a time in bounded memory, under a key of its own::

      header = b"SGE3" + frame size (u32, big endian) + salt (32 random bytes)
      key    = HKDF-SHA256(object key, salt, info="spotguard snapshot v3: object")
      frames = seal(frame_0) + seal(frame_1) + ... ; every frame holds ``frame size`` plaintext bytes but
               the last, which holds 0..frame size
      nonce  = 7 zero bytes + frame index (u32, big endian) + last-frame flag (1 byte)
      associated data = header + binding(instance_id, event_id, object name)

  Every object has its own key, so a nonce is never used twice under one key: format version 2 drew a
  7-byte random nonce prefix per object under the one fleet-wide key, and two objects with the same
  prefix (odds about n^2 / 2^57 after n objects) reused GCM nonces. The index stops frames being
  reordered or dropped, the flag stops truncation at a frame boundary, and the binding stops an object
  being moved to another snapshot or renamed within one.
- **the manifest**: HMAC-SHA256 over its canonical JSON (sorted keys, no spaces, ASCII), so a reader
  with the key refuses a manifest anyone else changed.

Older objects are still opened: version 2 (``b"SGE2" + frame size + 7-byte nonce prefix``, the object key
itself, nonce = prefix + index + flag) and version 1 (``b"SGE1" + nonce + ciphertext + tag``, the raw key,
the object name as associated data).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spotguard.errors import ConfigError, StoreError

MAGIC_V1 = b"SGE1"
MAGIC_V2 = b"SGE2"
MAGIC = b"SGE3"
"""What objects are written with; every magic here is read."""
NONCE_BYTES = 12
PREFIX_BYTES = 7
"""Version 2: random nonce prefix per object."""
SALT_BYTES = 32
"""Version 3: random HKDF salt per object (a 256-bit salt: two objects never share a key)."""
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 4 + SALT_BYTES
HEADER_BYTES_V2 = len(MAGIC_V2) + 4 + PREFIX_BYTES
_ZERO_PREFIX = bytes(PREFIX_BYTES)
FRAME_BYTES = 1 << 20
"""Plaintext bytes per frame: small enough to keep memory flat, big enough that the tags cost nothing."""
MAX_FRAME_BYTES = 16 << 20
"""Largest frame a reader accepts: a hostile header must not make it buffer gigabytes."""
OFFLOAD_BYTES = 256 * 1024
"""From this size on, sealing, opening and hashing run in a worker thread (the gate's loop keeps serving);
below it they run inline, which is cheaper than a thread."""
ALGORITHM = "AES-256-GCM"
MAC_ALGORITHM = "HMAC-SHA256"
_MAX_FRAMES = 1 << 32


def _derive(raw: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"spotguard snapshot v2: " + purpose).derive(raw)


@dataclass(frozen=True)
class Key:
    raw: bytes

    @property
    def key_id(self) -> str:
        """A fingerprint that names the key without revealing it."""
        return hashlib.sha256(b"spotguard-snapshot-key\x00" + self.raw).hexdigest()[:16]

    def object_key(self) -> bytes:
        return _derive(self.raw, b"object encryption")

    def key_for_object(self, salt: bytes) -> bytes:
        """The key of one format version 3 object, from its salt."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                    info=b"spotguard snapshot v3: object").derive(self.object_key())

    def manifest_key(self) -> bytes:
        return _derive(self.raw, b"manifest authentication")

    def describe(self) -> dict[str, str]:
        return {"algorithm": ALGORITHM, "key_id": self.key_id,
                "framing": f"SGE3, {FRAME_BYTES} byte frames, a key per object"}


def load_key(path: str) -> Key:
    """Read a key file: 32 raw bytes, or 64 hex characters (a trailing newline is fine)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"[snapshot] encryption_key_file {path!r} cannot be read: {exc.strerror}") from None
    if len(data) == 32:
        return Key(data)
    text = data.strip()
    if len(text) == 64:
        try:
            return Key(bytes.fromhex(text.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            pass
    raise ConfigError(f"[snapshot] encryption_key_file {path!r}: expected 32 raw bytes or 64 hex characters, "
                      f"got {len(data)} bytes (make one with: head -c 32 /dev/urandom > FILE)")


def binding(instance_id: str, event_id: str, name: str) -> bytes:
    """What an object is bound to: its snapshot (instance, event, as in the manifest) and its name."""
    parts = [b"spotguard-snapshot-object/2", instance_id.encode(), event_id.encode(), name.encode()]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


class Sealer:
    """Encrypts one object frame by frame: ``header`` first, then ``seal(frame, last)`` for each frame."""

    def __init__(self, key: Key, bound_to: bytes, frame_bytes: int = FRAME_BYTES) -> None:
        self.frame_bytes = frame_bytes
        salt = os.urandom(SALT_BYTES)
        self._aead = AESGCM(key.key_for_object(salt))
        self._prefix = _ZERO_PREFIX  # the key is this object's alone: the frame index makes every nonce unique
        self.header = MAGIC + struct.pack(">I", frame_bytes) + salt
        self._ad = self.header + bound_to
        self._index = 0
        self._done = False

    def seal(self, frame: bytes, last: bool) -> bytes:
        if self._done:
            raise ValueError("the last frame was sealed already")
        if len(frame) > self.frame_bytes or (not last and len(frame) != self.frame_bytes):
            raise ValueError(f"frame of {len(frame)} bytes (frames hold {self.frame_bytes}, the last fewer)")
        if self._index >= _MAX_FRAMES:
            raise ValueError("object too large for one framed stream")
        nonce = self._prefix + struct.pack(">IB", self._index, 1 if last else 0)
        self._index += 1
        self._done = last
        return self._aead.encrypt(nonce, frame, self._ad)


def seal(key: Key, bound_to: bytes, plaintext: bytes) -> bytes:
    """A whole object sealed at once (records, metadata: small objects)."""
    sealer = Sealer(key, bound_to)
    out = [sealer.header]
    frame = sealer.frame_bytes
    count = max(1, -(-len(plaintext) // frame))
    for index in range(count):
        out.append(sealer.seal(plaintext[index * frame:(index + 1) * frame], last=index == count - 1))
    return b"".join(out)


class Opener:
    """Decrypts a stored version 3 (or 2) object as its bytes arrive; memory stays within about two frames.

    ``feed`` returns the plaintext of every frame completed so far; ``finish`` the last frame's. Every
    frame is authenticated before its plaintext is returned; a stream cut short fails in ``finish``.
    """

    def __init__(self, key: Key, bound_to: bytes, name: str) -> None:
        self._key = key
        self._bound_to = bound_to
        self._name = name
        self._buffer = bytearray()
        self._aead: AESGCM | None = None
        self._prefix = b""
        self._ad = b""
        self._frame = 0
        self._index = 0

    def _fail(self, why: str) -> StoreError:
        return StoreError(f"{self._name}: {why}")

    def _open(self, sealed: bytes, last: bool) -> bytes:
        assert self._aead is not None
        nonce = self._prefix + struct.pack(">IB", self._index, 1 if last else 0)
        self._index += 1
        try:
            return self._aead.decrypt(nonce, sealed, self._ad)
        except InvalidTag:
            raise self._fail("authentication failed (wrong key, or the object was altered, truncated, "
                             "renamed or moved from another snapshot)") from None

    def _read_header(self) -> bool:
        """Parse the header once it is all in; False while more bytes are needed."""
        magic = bytes(self._buffer[:len(MAGIC)])
        if len(magic) < len(MAGIC):
            return False
        if magic not in (MAGIC, MAGIC_V2):
            raise self._fail("not a spotguard-encrypted object (format version 2 or 3)")
        size = HEADER_BYTES if magic == MAGIC else HEADER_BYTES_V2
        if len(self._buffer) < size:
            return False
        header = bytes(self._buffer[:size])
        (frame,) = struct.unpack(">I", header[len(MAGIC):len(MAGIC) + 4])
        if not 0 < frame <= MAX_FRAME_BYTES:
            raise self._fail(f"frame size {frame} in its header is out of range")
        self._frame = frame
        self._ad = header + self._bound_to
        if magic == MAGIC:
            self._prefix = _ZERO_PREFIX
            self._aead = AESGCM(self._key.key_for_object(header[len(MAGIC) + 4:]))
        else:
            self._prefix = header[len(MAGIC) + 4:]
            self._aead = AESGCM(self._key.object_key())
        del self._buffer[:size]
        return True

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        if self._aead is None and not self._read_header():
            return b""
        out = []
        sealed = self._frame + TAG_BYTES
        # A full frame is known not to be the last only once a byte after it has arrived.
        while len(self._buffer) > sealed:
            out.append(self._open(bytes(self._buffer[:sealed]), last=False))
            del self._buffer[:sealed]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._aead is None:
            raise self._fail("not a spotguard-encrypted object (too short for a header)")
        if len(self._buffer) < TAG_BYTES:
            raise self._fail("truncated (the last frame is missing)")
        last = self._open(bytes(self._buffer), last=True)
        self._buffer.clear()
        return last


def open_sealed(key: Key, bound_to: bytes, name: str, stored: bytes) -> bytes:
    """A whole version 3 (or 2) object opened at once."""
    opener = Opener(key, bound_to, name)
    return opener.feed(stored) + opener.finish()


def decrypt_v1(key: Key, name: str, stored: bytes) -> bytes:
    """A format version 1 object: one AES-GCM message under the raw key, the name as associated data."""
    if not stored.startswith(MAGIC_V1) or len(stored) < len(MAGIC_V1) + NONCE_BYTES + TAG_BYTES:
        raise StoreError(f"{name}: not a spotguard-encrypted object (format version 1)")
    nonce = stored[len(MAGIC_V1):len(MAGIC_V1) + NONCE_BYTES]
    try:
        return AESGCM(key.raw).decrypt(nonce, stored[len(MAGIC_V1) + NONCE_BYTES:], name.encode())
    except InvalidTag:
        raise StoreError(f"{name}: authentication failed (wrong key, or the object was altered)") from None


def manifest_mac(key: Key, canonical: bytes) -> str:
    return hmac.new(key.manifest_key(), canonical, hashlib.sha256).hexdigest()


def manifest_mac_ok(key: Key, canonical: bytes, mac: str) -> bool:
    return hmac.compare_digest(manifest_mac(key, canonical), mac)
