"""The asset-store contract: `BlobStore`, its value type, its errors and the streaming helpers.

Both the control plane and the serving/training containers keep files (checkpoints, LoRAs, datasets,
generated images) in one store addressed by *keys* such as ``models/lora/1234/style.safetensors``. The
contract is deliberately small (fsspec-like) so that local disk, S3 and an in-memory store for tests
behave the same: the same keys are valid everywhere, writes are atomic and verified by sha256, and large
files are streamed in bounded chunks instead of being held in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
"""Bytes read from a source per call: bounds the memory a stream costs regardless of file size."""

RESERVED_PREFIX = ".studio-"
"""Key segments may not start with this: stores keep their own bookkeeping (temp files, metadata) there."""

DEFAULT_CONTENT_TYPE = "application/octet-stream"
"""Recorded when `put` is given no content type, so every store reports the same thing."""

MAX_KEY_BYTES = 1000
MAX_SEGMENT_BYTES = 240

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class StorageError(Exception):
    """Base class of every asset-store error, so callers can translate them at the edge in one place."""


class BlobNotFound(StorageError, KeyError):
    """No blob under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no blob stored under key {self.key!r}"


class InvalidKey(StorageError, ValueError):
    """The key is malformed or would address something outside the store."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class ChecksumMismatch(StorageError, ValueError):
    """The bytes read do not hash to the sha256 the caller (or the store's metadata) promised."""

    def __init__(self, key: str, expected: str, actual: str, *, outcome: str = "nothing was stored") -> None:
        super().__init__(f"sha256 mismatch for {key!r}: expected {expected}, got {actual}; {outcome}")
        self.key = key
        self.expected = expected
        self.actual = actual


class UnknownScheme(StorageError, ValueError):
    """`open_store` was given a URL whose scheme has no registered store."""


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """What a store knows about one blob.

    `sha256` is None where the store cannot vouch for it (S3 listings carry no user metadata; a local
    file changed behind the store's back) rather than being recomputed silently, which could cost
    minutes on a multi-gigabyte checkpoint.
    """

    key: str
    size: int
    sha256: str | None = None
    modified: datetime | None = None
    content_type: str | None = None


class Readable(Protocol):
    """Any binary source: an open file, a `BytesIO`, an HTTP response, a Gradio upload."""

    def read(self, size: int = -1, /) -> bytes: ...


def validate_key(key: str) -> str:
    """Return `key` unchanged if every store can hold it under the same name, else raise `InvalidKey`.

    Keys are '/'-separated relative names. The rules are the union of what local disks and S3 need,
    so a key that works in tests (memory) works in production (S3) and can never climb out of a
    local root.
    """
    if not isinstance(key, str):
        raise InvalidKey(repr(key), f"must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey(key, "must not be empty")
    if key.startswith("/"):
        raise InvalidKey(key, "must be relative (no leading '/')")
    if "\\" in key:
        raise InvalidKey(key, "must not contain backslashes; use '/' to separate segments")
    if "\x00" in key:
        raise InvalidKey(key, "must not contain NUL")
    if _CONTROL_RE.search(key):
        raise InvalidKey(key, "must not contain control characters")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(key, f"longer than {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKey(key, "must not contain empty segments ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise InvalidKey(key, f"must not contain {segment!r} segments")
        if segment.startswith(RESERVED_PREFIX):
            raise InvalidKey(key, f"segments starting with {RESERVED_PREFIX!r} are reserved for the store")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidKey(key, f"segment {segment[:20]!r}... is longer than {MAX_SEGMENT_BYTES} bytes")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a `list` prefix: '' (everything) or a key, optionally ending in '/' or a partial name."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


def normalize_sha256(value: str | None) -> str | None:
    """Lower-case a hex sha256, refusing anything that is not one so a typo cannot pass as 'no check'."""
    if value is None:
        return None
    normalized = value.strip().lower()
    if not _SHA256_RE.fullmatch(normalized):
        raise ValueError(f"expected_sha256 must be 64 hex characters, got {value!r}")
    return normalized


class StreamDigest:
    """Running sha256 and byte count of a stream, fed chunk by chunk."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def check(self, key: str, expected: str | None, *, outcome: str = "nothing was stored") -> None:
        """Raise `ChecksumMismatch` naming both hashes unless the stream hashed to `expected`."""
        if expected is not None and self.sha256 != expected:
            raise ChecksumMismatch(key, expected, self.sha256, outcome=outcome)


def read_into(source: Readable, view: memoryview) -> int:
    """Read at most `len(view)` bytes from `source` into `view`; 0 means end of stream.

    Uses `readinto` where the source has it so no intermediate bytes object is allocated.
    """
    if isinstance(source, bytes | bytearray | memoryview | str):
        raise TypeError(
            f"a binary file object is required, not {type(source).__name__}; wrap it in io.BytesIO"
        )
    readinto = getattr(source, "readinto", None)
    if readinto is not None:
        count = readinto(view)
        if count is None:
            raise StorageError("the source is non-blocking and has no data ready; pass a blocking stream")
        return count
    data = source.read(len(view))
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"the source returned {type(data).__name__}, not bytes; open it in binary mode")
    view[: len(data)] = data
    return len(data)


def iter_chunks(source: Readable, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """Yield the stream as views into one reused buffer; each view is valid until the next is requested."""
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    while count := read_into(source, view):
        yield view[:count]


def copy_stream(source: Readable, target: IO[bytes]) -> StreamDigest:
    """Copy `source` into `target` in bounded chunks, hashing on the way."""
    digest = StreamDigest()
    for chunk in iter_chunks(source):
        digest.update(chunk)
        target.write(chunk)
    return digest


def fsync_directory(directory: Path) -> None:
    """Persist a rename: without this a crash can forget an `os.replace` that already returned."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of directory %s not supported", directory)
    finally:
        os.close(fd)


class BlobStore(ABC):
    """A flat namespace of immutable-once-written blobs, addressed by validated keys.

    Implementations provide the small core (`put`, `open`, `stat`, `delete`, `list`, `url`); the
    conveniences here are written once on top of it so every store behaves the same.
    """

    @abstractmethod
    def put(
        self,
        key: str,
        fileobj: Readable,
        *,
        content_type: str | None = None,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        """Store the rest of `fileobj` under `key`, atomically replacing any previous blob.

        The source is streamed in bounded chunks and hashed on the way. If `expected_sha256` is given
        and differs, `ChecksumMismatch` is raised and nothing is stored; if the source raises, nothing
        is stored either. Readers never see a partially written blob. Without a `content_type` the
        blob is recorded as `DEFAULT_CONTENT_TYPE`.
        """

    @abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """Open the blob for streaming reads (`read(n)` in chunks); raise `BlobNotFound` if absent."""

    @abstractmethod
    def stat(self, key: str) -> StoredBlob | None:
        """Describe the blob, or None if there is none under `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; deleting a missing key is not an error, so retries are safe."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[StoredBlob]:
        """Yield every blob whose key starts with `prefix` (a plain string prefix, as in S3), by key."""

    @abstractmethod
    def url(self, key: str, *, expires: int = 3600) -> str | None:
        """A time-limited URL a client can GET the blob from directly, or None.

        None means the store has no such URL (local and memory stores): the web app then streams the
        blob through its own authorised route using `open`. Callers must handle both.
        """

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str | None = None,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        """Store a local file; it is streamed, never read whole."""
        with open(path, "rb") as source:
            return self.put(key, source, content_type=content_type, expected_sha256=expected_sha256)

    def download_to(self, key: str, path: str | os.PathLike[str]) -> StoredBlob:
        """Stream the blob into `path`, atomically: `path` is either untouched or complete and verified.

        The bytes are written to a temporary file beside `path`, checked against the store's sha256
        when it has one, then renamed over `path`, so a crash or a corrupt transfer never leaves a
        truncated model where a loader would pick it up.
        """
        info = self.stat(key)
        if info is None:
            raise BlobNotFound(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f"{RESERVED_PREFIX}download-")
        try:
            with os.fdopen(fd, "wb") as temp, self.open(key) as source:
                digest = copy_stream(source, temp)
                temp.flush()
                os.fsync(temp.fileno())
            digest.check(key, info.sha256, outcome=f"{target} was left untouched")
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        fsync_directory(target.parent)
        logger.debug("downloaded %s to %s (%d bytes)", key, target, digest.size)
        return StoredBlob(key, digest.size, digest.sha256, info.modified, info.content_type)

    def close(self) -> None:
        """Release network clients and the like; the base store holds nothing."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
