"""Opening the snapshot store through obstore, with every obstore error wrapped into ``StoreError``.

Credentials always come from the machine's own identity through obstore's default chains (instance
profile, metadata-server service account, managed identity, or the usual environment variables).
The only credentials this module ever supplies are the public, well-known Azurite ones, and only when
the endpoint is on loopback.

URL forms: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix`` (account from
``AZURE_STORAGE_ACCOUNT_NAME``) or ``az://container@account/prefix``, ``file:///abs/dir``.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import AzureStore, GCSStore, LocalStore, S3Store

from spotguard.errors import ConfigError, StoreError
from spotguard.netloc import is_loopback

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore, RetryConfig, S3Config

    from spotguard.config import SnapshotConfig

T = TypeVar("T")

PART_SIZE = 8 * 1024 * 1024
"""Objects above this go up as multipart uploads, parts in parallel (S3's minimum part is 5 MiB)."""

PART_CONCURRENCY = 8

STREAM_CHUNK = 8 * 1024 * 1024
"""Bytes per ranged read when an object is read as a stream (downloads, KV files): memory stays flat."""

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's published development key: not a secret, and only ever sent to a loopback endpoint."""

SCHEMES = ("s3", "gs", "az", "file")


class MissingObject(StoreError):
    """The object does not exist (a snapshot without manifest.json is incomplete, never guessed at)."""


@dataclass(frozen=True, kw_only=True)
class StoreOptions:
    """How to reach the store; everything except the URL is optional."""

    endpoint_url: str = ""
    server_side_encryption: str = ""
    sse_kms_key_id: str = ""
    connect_timeout: float = 2.0
    request_timeout: float = 60.0
    max_retries: int = 3

    @classmethod
    def from_config(cls, config: SnapshotConfig) -> StoreOptions:
        return cls(endpoint_url=config.endpoint_url, server_side_encryption=config.server_side_encryption,
                   sse_kms_key_id=config.sse_kms_key_id)


@dataclass(frozen=True)
class ObjectInfo:
    path: str
    size: int


def _client_options(options: StoreOptions) -> ClientConfig:
    client: ClientConfig = {"connect_timeout": timedelta(seconds=options.connect_timeout),
                            "timeout": timedelta(seconds=options.request_timeout)}
    if options.endpoint_url:
        scheme = urlsplit(options.endpoint_url).scheme
        if scheme not in ("http", "https"):
            raise ConfigError(f"[snapshot] endpoint_url: expected http(s)://host:port, got {options.endpoint_url!r}")
        if scheme == "http":
            # Plain HTTP only to emulators on this machine: anything else carries user data in the clear.
            if not is_loopback(options.endpoint_url):
                raise ConfigError("[snapshot] endpoint_url: plain http is only allowed to a loopback emulator; "
                                  "use https")
            client["allow_http"] = True
    return client


def _retry(options: StoreOptions) -> RetryConfig:
    # obstore's default keeps retrying for minutes; the drain's own deadline is far shorter.
    return {"max_retries": options.max_retries, "retry_timeout": timedelta(seconds=10),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1),
                        "base": 2}}


def _build(url: str, options: StoreOptions) -> ObjectStore:
    parts = urlsplit(url)
    scheme = parts.scheme
    prefix = parts.path.strip("/") or None
    client = _client_options(options)
    retry = _retry(options)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"[snapshot] url: file URLs need an absolute path (file:///dir), got {url!r}")
        root = Path(parts.path)
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    if not parts.netloc:
        raise ConfigError(f"[snapshot] url: {url!r} names no bucket/container")
    if scheme == "s3":
        s3: S3Config = {}
        if options.endpoint_url:
            s3["endpoint"] = options.endpoint_url.rstrip("/")
        if options.server_side_encryption:
            s3["server_side_encryption"] = options.server_side_encryption
        if options.sse_kms_key_id:
            if options.server_side_encryption not in ("aws:kms", "aws:kms:dsse"):
                raise ConfigError("[snapshot] sse_kms_key_id needs server_side_encryption = aws:kms or aws:kms:dsse")
            s3["sse_kms_key_id"] = options.sse_kms_key_id
        return S3Store(parts.netloc, prefix=prefix, client_options=client, retry_config=retry, config=s3)
    if options.server_side_encryption or options.sse_kms_key_id:
        raise ConfigError("[snapshot] server_side_encryption/sse_kms_key_id apply to s3:// stores only")
    if scheme == "gs":
        if options.endpoint_url:
            return GCSStore(parts.netloc, prefix=prefix, client_options=client, retry_config=retry,
                            base_url=options.endpoint_url.rstrip("/"))
        return GCSStore(parts.netloc, prefix=prefix, client_options=client, retry_config=retry)
    if scheme == "az":
        container, _, account = parts.netloc.partition("@")
        if options.endpoint_url and is_loopback(options.endpoint_url):
            endpoint = options.endpoint_url.rstrip("/")
            if not urlsplit(endpoint).path.strip("/"):
                endpoint = f"{endpoint}/{AZURITE_ACCOUNT}"
            return AzureStore(container, prefix=prefix, client_options=client, retry_config=retry,
                              account_name=AZURITE_ACCOUNT, account_key=AZURITE_KEY, endpoint=endpoint)
        if account and options.endpoint_url:
            return AzureStore(container, prefix=prefix, client_options=client, retry_config=retry,
                              account_name=account, endpoint=options.endpoint_url.rstrip("/"))
        if account:
            return AzureStore(container, prefix=prefix, client_options=client, retry_config=retry,
                              account_name=account)
        if options.endpoint_url:
            return AzureStore(container, prefix=prefix, client_options=client, retry_config=retry,
                              endpoint=options.endpoint_url.rstrip("/"))
        return AzureStore(container, prefix=prefix, client_options=client, retry_config=retry)
    raise ConfigError(f"[snapshot] url: scheme {scheme!r} of {url!r} is not one of {', '.join(SCHEMES)}")


@dataclass(frozen=True)
class Store:
    """A store rooted at ``url``; paths are relative to it. Every method raises ``StoreError``."""

    url: str
    inner: ObjectStore

    def child(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p.strip("/"))

    async def put(self, path: str, data: bytes) -> None:
        """Upload atomically; big objects go up as a multipart upload with parts in parallel."""
        await self._call(f"put {path}", obstore.put_async(
            self.inner, path, data, use_multipart=len(data) > PART_SIZE, chunk_size=PART_SIZE,
            max_concurrency=PART_CONCURRENCY))

    async def put_stream(self, path: str, parts: AsyncIterable[bytes], *, concurrency: int = PART_CONCURRENCY) -> None:
        """Upload from an async stream as a multipart upload: at most ``concurrency`` parts of PART_SIZE
        are held at once, whatever the object's size; nothing is visible at ``path`` until it completes."""
        await self._call(f"put {path}", obstore.put_async(
            self.inner, path, parts, use_multipart=True, chunk_size=PART_SIZE, max_concurrency=concurrency))

    async def get(self, path: str, *, limit: int | None = None) -> bytes:
        """The whole object; with ``limit``, StoreError without reading it when it is longer."""
        if limit is None:
            async def fetch() -> bytes:
                result = await obstore.get_async(self.inner, path)
                return bytes(await result.bytes_async())

            return await self._call(f"get {path}", fetch())
        size = await self.size(path)
        if size > limit:
            raise StoreError(f"{self.url}: get {path}: {size} bytes, larger than the {limit} bytes expected")
        return await self.read_range(path, 0, size)

    async def size(self, path: str) -> int:
        async def head() -> int:
            return int((await obstore.head_async(self.inner, path))["size"])

        return await self._call(f"head {path}", head())

    async def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the object; at most ``end - start`` whatever the object holds."""
        if end <= start:
            return b""

        async def fetch() -> bytes:
            return bytes(await obstore.get_range_async(self.inner, path, start=start, end=end))

        return await self._call(f"get {path} [{start}:{end}]", fetch())

    async def stream(self, path: str, size: int | None = None) -> AsyncGenerator[bytes, None]:
        """The object's first ``size`` bytes (default: its size now) in ranged reads of STREAM_CHUNK.

        Each chunk is its own request, so a reader that stops early (a hostile object) leaves no
        transfer running behind it, and memory stays at one chunk whatever the object's size.
        """
        total = await self.size(path) if size is None else size
        offset = 0
        while offset < total:
            want = min(total - offset, STREAM_CHUNK)
            chunk = await self.read_range(path, offset, offset + want)
            if chunk:
                yield chunk
            if len(chunk) < want:
                return  # the object is shorter than expected: the caller's size check says so
            offset += want

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        async def collect() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            async for batch in obstore.list(self.inner, prefix or None, chunk_size=1000):
                found.extend(ObjectInfo(str(meta["path"]), int(meta["size"])) for meta in batch)
            return found

        return await self._call(f"list {prefix or '/'}", collect())

    async def children(self, prefix: str = "") -> builtins.list[str]:
        """The "directories" right under ``prefix`` (one delimiter listing: keys deeper down are not parsed)."""
        async def collect() -> builtins.list[str]:
            result = await obstore.list_with_delimiter_async(self.inner, prefix or None)
            return [str(p) for p in result["common_prefixes"]]

        return await self._call(f"list {prefix or '/'}", collect())

    async def delete(self, path: str) -> None:
        await self._call(f"delete {path}", obstore.delete_async(self.inner, path))

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (NotFoundError, FileNotFoundError) as exc:  # obstore raises the builtin one for a 404
            raise MissingObject(f"{self.url}: {what}: not found") from exc
        except BaseError as exc:
            raise StoreError(f"{self.url}: {what} failed: {_first_line(exc)}") from exc
        except OSError as exc:
            raise StoreError(f"{self.url}: {what} failed: {exc}") from exc
        except ValueError as exc:  # obstore refuses some paths (``..``, ``//``) with a plain ValueError
            raise StoreError(f"{self.url}: {what} refused: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:300] + "..."


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """A ``Store`` for ``url``; a bad URL or setting raises ``ConfigError``, an obstore refusal ``StoreError``."""
    if not url:
        raise ConfigError("[snapshot] url is empty: set it to s3://, gs://, az:// or file:// to save snapshots")
    if urlsplit(url).scheme not in SCHEMES:
        raise ConfigError(f"[snapshot] url: {url!r} must start with one of "
                          f"{', '.join(s + '://' for s in SCHEMES)}")
    try:
        inner = _build(url, options or StoreOptions())
    except BaseError as exc:
        raise StoreError(f"cannot open store {url}: {_first_line(exc)}") from exc
    except OSError as exc:
        raise StoreError(f"cannot open store {url}: {exc}") from exc
    return Store(url.rstrip("/"), inner)
