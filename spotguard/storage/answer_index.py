"""The answer index: one small object per answer cut at an eviction, so any gate of the fleet can finish it.

A gate that cuts an answer it cannot finish writes what continuing it needs (the request, the output so
far, the identity the client saw) to the snapshot store. A retry that lands on another gate after the
holder is gone finds it there: by answer id when it carries a cursor, by request fingerprint when it
does not. Layout under ``[snapshot] url``::

    _answers/a-<answer id>.json      the entry (IndexEntry)
    _answers/f-<fingerprint>.json    a pointer: the newest cut answer to that request

``_answers`` can never be an instance id of a snapshot (``format.safe_segment`` strips a leading ``_``),
and its objects are two levels deep, so ``spotguard snapshots`` does not list them as snapshots.

Every object is ``b"SGA1" + HMAC-SHA256(index key, context | name | payload) + payload``, under a key
derived from ``[resume] key_file``: only a gate of the fleet writes an entry another gate believes, and an
object cannot be moved to another name. The payload is the entry's JSON, sealed with ``[snapshot]
encryption_key_file`` when one is set (``crypto.seal``, bound to the object's name), plain otherwise.

Entries hold user data (prompts, outputs) exactly as snapshot records do: in a file:// store they are
written 0600 in a 0700 directory, never through a symlink (``names.SafeFile``). Everything read back is
hostile: names are checked before they become keys, reads are bounded in size, the MAC is checked before
anything is parsed, the JSON's shape and sizes are validated, and an expired entry is None. Every call is
bounded by a deadline (``anyio.current_time()`` clock); errors and timeouts are ``StoreError``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio

from spotguard.errors import ResumeRefused, StoreError
from spotguard.resume_names import ANSWER_ID, FINGERPRINT, holder_problem
from spotguard.storage import crypto
from spotguard.storage.format import RECORD_ENDPOINTS
from spotguard.storage.names import SafeFile
from spotguard.storage.store import MissingObject, Store

if TYPE_CHECKING:
    from spotguard.metrics import Metrics

INDEX_DIR = "_answers"
FORMAT = "spotguard-answer"
VERSION = 1
MAGIC = b"SGA1"
MAC_BYTES = 32
MAX_ENTRY_BYTES = 32 << 20
"""Largest stored entry written or read (request body plus output so far, sealed): a bigger one is refused."""
MAX_POINTER_BYTES = 4096
_CONTEXT = b"spotguard-answer-index/1\x00"


@dataclass(frozen=True, kw_only=True)
class KeptIdentity:
    """What the client saw of the answer, kept on the continuation: its ``id``, ``created``, ``model`` and
    ``object``, and whether the assistant role was sent already."""

    id: str | None = None
    created: int | None = None
    model: str | None = None
    object: str | None = None
    role_sent: bool = False


@dataclass(frozen=True, kw_only=True)
class IndexEntry:
    """One cut answer: who held it, the request, and the output the client already has."""

    answer_id: str
    fingerprint: str
    holder: str
    endpoint: str
    model: str
    stream: bool
    body: bytes
    """The original request body, unchanged."""
    output: str
    """The answer's text so far (after ``prefix``): what continuing ``body`` appends."""
    delivered: int
    """Events the client had (the offset a cursor names after them)."""
    identity: KeptIdentity
    created: float
    """Unix time of the cut."""
    expires: float
    tokens: int = 0
    """Output tokens ``output`` holds (what a continuation takes off ``body``'s token limit)."""
    prefix: str = ""
    """Text the client had before ``body``'s answer began (``body`` itself continues an earlier answer)."""

    def to_json(self) -> dict[str, Any]:
        try:
            body, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        identity = self.identity
        return {"format": FORMAT, "version": VERSION, "answer_id": self.answer_id, "fingerprint": self.fingerprint,
                "holder": self.holder, "endpoint": self.endpoint, "model": self.model, "stream": self.stream,
                "body": body, "body_encoding": encoding, "output": self.output, "delivered": self.delivered,
                "identity": {"id": identity.id, "created": identity.created, "model": identity.model,
                             "object": identity.object, "role_sent": identity.role_sent},
                "created": self.created, "expires": self.expires, "tokens": self.tokens, "prefix": self.prefix}

    @classmethod
    def from_json(cls, data: Any) -> IndexEntry:
        """An entry from parsed JSON; ValueError saying which field is wrong."""
        data = _obj(data, "entry")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} entry of version {VERSION}")
        answer_id = _text(data, "answer_id", 64)
        fingerprint = _text(data, "fingerprint", 32)
        holder = _text(data, "holder", 200)
        endpoint = _text(data, "endpoint", 64)
        if not ANSWER_ID.fullmatch(answer_id) or not FINGERPRINT.fullmatch(fingerprint):
            raise ValueError("answer_id or fingerprint is not one this format writes")
        if holder_problem(holder):
            raise ValueError("holder is not an http(s) base URL")
        if endpoint not in RECORD_ENDPOINTS:
            raise ValueError(f"endpoint is not one of {', '.join(RECORD_ENDPOINTS)}")
        raw = data.get("identity")
        identity = _obj(raw, "identity")
        created = identity.get("created")
        if created is not None and (not isinstance(created, int) or isinstance(created, bool)):
            raise ValueError("identity.created must be an integer or null")
        kept = KeptIdentity(id=_opt_text(identity, "id"), created=created, model=_opt_text(identity, "model"),
                            object=_opt_text(identity, "object"), role_sent=_flag(identity, "role_sent"))
        return cls(answer_id=answer_id, fingerprint=fingerprint, holder=holder, endpoint=endpoint,
                   model=_text(data, "model", 1024), stream=_flag(data, "stream"), body=_body(data),
                   output=_text(data, "output", MAX_ENTRY_BYTES), delivered=_count(data, "delivered"),
                   identity=kept, created=_time(data, "created"), expires=_time(data, "expires"),
                   tokens=_count(data, "tokens") if "tokens" in data else 0,
                   prefix=_text(data, "prefix", MAX_ENTRY_BYTES) if "prefix" in data else "")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def _text(data: dict[str, Any], key: str, limit: int) -> str:
    value = data.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{key} must be a string of at most {limit} characters")
    return value


def _opt_text(data: dict[str, Any], key: str) -> str | None:
    return None if data.get(key) is None else _text(data, key, 1024)


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _count(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 40:
        raise ValueError(f"{key} must be a non-negative integer")
    return value


def _time(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1 << 40:
        raise ValueError(f"{key} must be a unix time")
    return float(value)


def _body(data: dict[str, Any]) -> bytes:
    text = _text(data, "body", MAX_ENTRY_BYTES)
    encoding = data.get("body_encoding")
    if encoding == "utf-8":
        return text.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError("body is not valid base64") from None
    raise ValueError("body_encoding must be utf-8 or base64")


def entry_name(answer_id: str) -> str:
    if not ANSWER_ID.fullmatch(answer_id):
        raise ResumeRefused("malformed", "resume refused: not an answer id")
    return f"{INDEX_DIR}/a-{answer_id}.json"


def pointer_name(fingerprint: str) -> str:
    if not FINGERPRINT.fullmatch(fingerprint):
        raise ResumeRefused("malformed", "resume refused: not a request fingerprint")
    return f"{INDEX_DIR}/f-{fingerprint}.json"


class AnswerIndex:
    """Writes and finds index entries in one store. ``index_key`` is ``CursorKey.index_key`` (the fleet's
    resume key); ``seal_key`` the snapshot encryption key, or None to store the JSON in plain text."""

    def __init__(self, store: Store, *, index_key: bytes, seal_key: crypto.Key | None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self._index_key = index_key
        self._seal_key = seal_key
        self._metrics = metrics
        self._counts: dict[tuple[str, str], int] = {}
        parts = urlsplit(store.url)
        self._local_root = Path(parts.path) if parts.scheme == "file" else None

    async def write(self, entry: IndexEntry, *, deadline: float) -> None:
        """Store ``entry`` and point its fingerprint at it (both at once); StoreError when that fails or
        does not finish by ``deadline``."""
        name = entry_name(entry.answer_id)
        pointer = {"format": FORMAT, "version": VERSION, "answer_id": entry.answer_id,
                   "fingerprint": entry.fingerprint, "expires": entry.expires}
        plain = _dump(entry.to_json())
        if len(plain) > MAX_ENTRY_BYTES - 1024:
            self._count("write", "too_big")
            raise StoreError(f"{self.store.url}/{name}: {len(plain)} bytes, more than an index entry may hold")
        async with self._bounded("write", deadline):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._put, name, plain, name="answer-index-entry")
                tg.start_soon(self._put, pointer_name(entry.fingerprint), _dump(pointer), name="answer-index-pointer")
        self._count("write", "ok")

    async def find(self, answer_id: str, fingerprint: str, *, now: float, deadline: float) -> IndexEntry | None:
        """The entry of answer ``answer_id`` (from a verified cursor) when it answers the request with
        ``fingerprint`` and has not expired; None when there is none."""
        async with self._bounded("lookup", deadline):
            entry = await self._entry(answer_id, fingerprint, now)
        self._count("lookup", "found" if entry else "missing")
        return entry

    async def find_by_fingerprint(self, fingerprint: str, *, now: float, deadline: float) -> IndexEntry | None:
        """The newest unexpired entry answering the request with ``fingerprint`` (a retry with no cursor)."""
        async with self._bounded("lookup", deadline):
            answer_id = await self._pointed(fingerprint, now)
            entry = await self._entry(answer_id, fingerprint, now) if answer_id else None
        self._count("lookup", "found" if entry else "missing")
        return entry

    async def forget(self, answer_id: str, fingerprint: str, *, deadline: float) -> None:
        """Delete an entry (its answer was resumed), and its fingerprint's pointer if it still points at it."""
        async with self._bounded("forget", deadline):
            if await self._pointed(fingerprint, None) == answer_id:
                await self._delete(pointer_name(fingerprint))
            await self._delete(entry_name(answer_id))
        self._count("forget", "ok")

    # -- reading hostile objects ----------------------------------------------------------------------

    async def _entry(self, answer_id: str, fingerprint: str, now: float) -> IndexEntry | None:
        name = entry_name(answer_id)
        data = await self._get(name, MAX_ENTRY_BYTES)
        if data is None:
            return None
        try:
            entry = IndexEntry.from_json(data)
        except ValueError as exc:
            raise StoreError(f"{self.store.url}/{name}: not a valid index entry: {exc}") from None
        if entry.answer_id != answer_id or not hmac.compare_digest(entry.fingerprint, fingerprint):
            return None  # another request's answer: nothing for this one
        return entry if entry.expires > now else None

    async def _pointed(self, fingerprint: str, now: float | None) -> str | None:
        name = pointer_name(fingerprint)
        data = await self._get(name, MAX_POINTER_BYTES)
        if data is None:
            return None
        try:
            pointer = _obj(data, "pointer")
            answer_id = _text(pointer, "answer_id", 64)
            expires = _time(pointer, "expires")
            if pointer.get("format") != FORMAT or not ANSWER_ID.fullmatch(answer_id) \
                    or pointer.get("fingerprint") != fingerprint:
                raise ValueError("not a pointer of this format to this fingerprint")
        except ValueError as exc:
            raise StoreError(f"{self.store.url}/{name}: not a valid index pointer: {exc}") from None
        return answer_id if now is None or expires > now else None

    async def _get(self, name: str, limit: int) -> Any:
        """The object's JSON, authenticated and opened; None when there is no such object."""
        try:
            # One ranged read, never more than limit + 1 bytes, whatever the object holds.
            stored = await self.store.read_range(name, 0, limit + 1)
        except MissingObject:
            return None
        if len(stored) > limit:
            raise StoreError(f"{self.store.url}/{name}: larger than the {limit} bytes an index object may hold")
        payload = self._authenticated(name, stored)
        sealed = not payload.startswith(b"{")  # plain entries are JSON objects; sealed ones start with crypto's magic
        if sealed != (self._seal_key is not None):
            raise StoreError(f"{self.store.url}/{name}: " + (
                "encrypted, and [snapshot] encryption_key_file is not set here" if sealed else
                "not encrypted, but [snapshot] encryption_key_file is set: refusing a plain index object"))
        if self._seal_key is not None:
            payload = await _maybe_thread(crypto.open_sealed, self._seal_key, _binding(name), name, payload)
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{self.store.url}/{name}: not JSON") from None

    def _authenticated(self, name: str, stored: bytes) -> bytes:
        head = len(MAGIC) + MAC_BYTES
        if len(stored) < head or not stored.startswith(MAGIC):
            raise StoreError(f"{self.store.url}/{name}: not a spotguard answer index object")
        payload = stored[head:]
        if not hmac.compare_digest(stored[len(MAGIC):head], self._mac(name, payload)):
            raise StoreError(f"{self.store.url}/{name}: authentication failed (another fleet's [resume] key_file, "
                             "or the object was altered or renamed)")
        return payload

    def _mac(self, name: str, payload: bytes) -> bytes:
        return hmac.new(self._index_key, _CONTEXT + name.encode() + b"\x00" + payload, hashlib.sha256).digest()

    # -- writing ---------------------------------------------------------------------------------------

    async def _put(self, name: str, plain: bytes) -> None:
        payload = plain
        if self._seal_key is not None:
            payload = await _maybe_thread(crypto.seal, self._seal_key, _binding(name), plain)
        stored = MAGIC + self._mac(name, payload) + payload
        if self._local_root is None:
            await self.store.put(name, stored)
        else:
            await anyio.to_thread.run_sync(_write_private, self._local_root, name, stored, abandon_on_cancel=True)

    async def _delete(self, name: str) -> None:
        try:
            await self.store.delete(name)
        except MissingObject:
            pass

    @contextlib.asynccontextmanager
    async def _bounded(self, op: str, deadline: float) -> AsyncIterator[None]:
        """``deadline`` as a scope: a timeout becomes StoreError, and every failure is counted."""
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                yield
        except TimeoutError:
            self._count(op, "timeout")
            raise StoreError(f"{self.store.url}: index {op} did not finish by its deadline") from None
        except StoreError:
            self._count(op, "error")
            raise

    def _count(self, op: str, result: str) -> None:
        self._counts[(op, result)] = self._counts.get((op, result), 0) + 1
        if self._metrics is not None:
            self._metrics.resume_index.labels(op=op, result=result).inc()

    def counts(self) -> list[tuple[str, str, int]]:
        """(op, result, times) so far: the gate process reports them for the daemon's /metrics."""
        return [(op, result, n) for (op, result), n in sorted(self._counts.items())]


def _binding(name: str) -> bytes:
    # The snapshot binding with a segment no snapshot can have (instance ids never start with "_").
    return crypto.binding(INDEX_DIR, f"{FORMAT}/{VERSION}", name)


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _maybe_thread(func: Callable[..., bytes], *args: Any) -> bytes:
    if len(args[-1]) < crypto.OFFLOAD_BYTES:
        return bytes(func(*args))
    return bytes(await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True))


def _write_private(root: Path, name: str, data: bytes) -> None:
    """A file:// store: mode 0600 in a 0700 directory, never through a symlink, published atomically."""
    target = SafeFile(root, name)
    try:
        target.write(data)
    except BaseException:
        target.discard()
        raise
    target.commit()
