"""Names from a snapshot are hostile input: checked before they reach a store, a URL or a disk.

Anyone who can write the bucket (or a compromised VM of the fleet) writes manifests. A name such as
``/etc/cron.d/x``, ``../../.ssh/authorized_keys``, ``a//b`` or one with control characters must never
become a path outside the snapshot, a store key outside it, or an escape sequence on a terminal.
``check_name`` accepts only the names this format writes; ``SafeFile`` writes under a directory
without following symlinks planted there.
"""

from __future__ import annotations

import os
import re
import secrets
import unicodedata
from pathlib import Path

from spotguard.errors import StoreError

MAX_NAME = 128
_OBJECT = re.compile(r"records/[0-9]{6,9}\.jsonl|kv/slot-[0-9]{1,6}\.(?:bin|json)")
KIND_SUFFIX = {"records": ".jsonl", "kv": ".bin", "kv_meta": ".json"}


def shown(text: str, limit: int = 200) -> str:
    """``text`` safe to print: control and format characters escaped, long text cut."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)


def problem(name: object) -> str:
    """Why ``name`` is not a snapshot object name; empty when it is one."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in name):
        return "holds control characters"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if "\\" in name:
        return "holds a backslash"
    segments = name.split("/")
    if ".." in segments:
        return "climbs out of the snapshot (..)"
    if "." in segments or "" in segments:
        return "is not normalised (., // or a trailing /)"
    if not _OBJECT.fullmatch(name):
        return "is not a name this format writes (records/NNNNNN.jsonl, kv/slot-N.bin, kv/slot-N.json)"
    return ""


def check_name(name: object, kind: str | None = None) -> str:
    """``name`` when it is a plain object name inside the snapshot (of ``kind``); else StoreError naming it."""
    why = problem(name)
    if why:
        raise StoreError(f"object name {shown(repr(name))} {why}: refusing the snapshot")
    assert isinstance(name, str)
    if kind is not None:
        suffix = KIND_SUFFIX.get(kind)
        if suffix is None:
            raise StoreError(f"object {name!r}: unknown kind {shown(repr(kind))}")
        if not name.endswith(suffix) or (kind == "records") != name.startswith("records/"):
            raise StoreError(f"object {name!r}: a {kind} object cannot have this name: refusing the snapshot")
    return name


class SafeFile:
    """A file written under ``root`` at the relative ``name``, never through a symlink, published atomically.

    Every directory on the way is opened with O_NOFOLLOW relative to its parent, the data goes to a
    fresh temporary file (O_EXCL) and ``commit`` renames it into place (a symlink already at the name
    is replaced, not followed); ``discard`` leaves nothing behind. Blocking: call from a worker thread.
    """

    def __init__(self, root: Path, name: str) -> None:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"{name!r}: not a relative name")
        root.mkdir(parents=True, exist_ok=True)
        self.path = root.joinpath(*parts)
        self._final = parts[-1]
        self._temp = f".{self._final}.{secrets.token_hex(6)}.part"
        self._dir = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self._fd = -1
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o700, dir_fd=self._dir)
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self._dir)
                except OSError as exc:
                    raise StoreError(f"{root / part}: not a plain directory ({exc.strerror}); refusing to "
                                     f"write through it") from None
                os.close(self._dir)
                self._dir = child
            self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                               dir_fd=self._dir)
        except BaseException:
            os.close(self._dir)
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def commit(self) -> Path:
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._temp, self._final, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError as exc:
            self.discard()
            raise StoreError(f"{self.path}: cannot be written: {exc.strerror}") from None
        os.close(self._dir)
        self._dir = -1
        return self.path

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir >= 0:
            try:
                os.unlink(self._temp, dir_fd=self._dir)
            except FileNotFoundError:
                pass
            os.close(self._dir)
            self._dir = -1
