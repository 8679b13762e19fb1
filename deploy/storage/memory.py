"""`MemoryStore`: blobs in a dict, for tests and throwaway runs.

It follows the same contract as the durable stores (key rules, atomic verified puts, not-found
errors) so code tested against it behaves the same on disk or S3. Like S3 and unlike a filesystem, a
key may be both a blob and a prefix of other keys. Each instance is independent: there is no
process-wide namespace to leak state between tests.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO

from deploy.storage.base import (
    DEFAULT_CONTENT_TYPE,
    BlobNotFound,
    BlobStore,
    Readable,
    StoredBlob,
    StreamDigest,
    iter_chunks,
    normalize_sha256,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)


class MemoryStore(BlobStore):
    """Thread-safe in-memory store; contents vanish with the instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, tuple[bytes, StoredBlob]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._blobs)} blobs)"

    def put(
        self,
        key: str,
        fileobj: Readable,
        *,
        content_type: str | None = None,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        validate_key(key)
        expected = normalize_sha256(expected_sha256)
        buffer = bytearray()
        digest = StreamDigest()
        for chunk in iter_chunks(fileobj):
            digest.update(chunk)
            buffer += chunk
        digest.check(key, expected)
        blob = StoredBlob(
            key, digest.size, digest.sha256, datetime.now(UTC), content_type or DEFAULT_CONTENT_TYPE
        )
        with self._lock:
            self._blobs[key] = (bytes(buffer), blob)
        logger.debug("stored %s in memory (%d bytes)", key, blob.size)
        return blob

    def open(self, key: str) -> IO[bytes]:
        validate_key(key)
        with self._lock:
            entry = self._blobs.get(key)
        if entry is None:
            raise BlobNotFound(key)
        return io.BytesIO(entry[0])

    def stat(self, key: str) -> StoredBlob | None:
        validate_key(key)
        with self._lock:
            entry = self._blobs.get(key)
        return None if entry is None else entry[1]

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._blobs.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[StoredBlob]:
        validate_prefix(prefix)
        with self._lock:
            blobs = [blob for key, (_, blob) in self._blobs.items() if key.startswith(prefix)]
        yield from sorted(blobs, key=lambda blob: blob.key)

    def url(self, key: str, *, expires: int = 3600) -> str | None:
        """Always None: like local blobs, memory blobs are only reachable through `open`."""
        validate_key(key)
        return None
