"""Optional client-side AES-256-GCM of every snapshot object except the manifest.

Stored bytes: ``b"SGE1" + nonce (12 random bytes) + ciphertext + tag``. A fresh random nonce per
object; the object's name inside the snapshot (``records/000000.jsonl``) is the associated data, so
objects cannot be swapped for one another without the tag failing. The manifest stays readable
without the key (it holds names, sizes, hashes and timings, no user data) and names the key by a
short fingerprint so a reader can say "wrong key" instead of "corrupt".
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spotguard.errors import ConfigError, StoreError

MAGIC = b"SGE1"
NONCE_BYTES = 12
ALGORITHM = "AES-256-GCM"


@dataclass(frozen=True)
class Key:
    raw: bytes

    @property
    def key_id(self) -> str:
        """A fingerprint that names the key without revealing it."""
        return hashlib.sha256(b"spotguard-snapshot-key\x00" + self.raw).hexdigest()[:16]

    def describe(self) -> dict[str, str]:
        return {"algorithm": ALGORITHM, "key_id": self.key_id}


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


def encrypt(key: Key, name: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key.raw).encrypt(nonce, plaintext, name.encode())


def decrypt(key: Key, name: str, stored: bytes) -> bytes:
    if not stored.startswith(MAGIC) or len(stored) < len(MAGIC) + NONCE_BYTES + 16:
        raise StoreError(f"{name}: not a spotguard-encrypted object")
    nonce = stored[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key.raw).decrypt(nonce, stored[len(MAGIC) + NONCE_BYTES:], name.encode())
    except InvalidTag:
        raise StoreError(f"{name}: authentication failed (wrong key, or the object was altered)") from None
