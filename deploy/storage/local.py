"""`LocalStore`: blobs as plain files under one root directory (the default store).

Layout: the blob for key ``a/b.bin`` is the file ``<root>/a/b.bin``, so operators can inspect and back
up the store with ordinary tools. What a filesystem does not keep (the sha256 and content type) lives
in a sidecar ``<root>/.studio-meta/a/b.bin.json`` that records the file's size and mtime; if the file
is later changed behind the store's back the sidecar no longer matches and `stat` reports the hash as
unknown instead of vouching for bytes it never saw.

Writes go to a temporary file in the target directory, are fsynced, then renamed into place, so a
reader or a crash never observes half a checkpoint. Paths are resolved and must stay inside the root:
a key can never reach outside it, not even through a symlink planted inside the root.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from deploy.storage.base import (
    DEFAULT_CONTENT_TYPE,
    RESERVED_PREFIX,
    BlobNotFound,
    BlobStore,
    InvalidKey,
    Readable,
    StorageError,
    StoredBlob,
    StreamDigest,
    fsync_directory,
    iter_chunks,
    normalize_sha256,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)

META_DIR = f"{RESERVED_PREFIX}meta"
TEMP_PREFIX = f"{RESERVED_PREFIX}tmp-"


class LocalStore(BlobStore):
    """Blobs as files under `root`; safe for several threads and processes sharing one root."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        path = Path(root).expanduser()
        if create and not path.exists():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create local store root {str(path)!r}: {exc}") from exc
        if not path.is_dir():
            raise StorageError(f"local store root {str(path)!r} is not a directory")
        self._root = path.resolve()

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"LocalStore({str(self._root)!r})"

    # -- paths ---------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The resolved file path for `key`, refusing anything that resolves outside the root."""
        validate_key(key)
        resolved = self._root.joinpath(*key.split("/")).resolve()
        if not resolved.is_relative_to(self._root):
            raise InvalidKey(key, f"resolves outside the store root {str(self._root)!r} (through a symlink)")
        return resolved

    def _meta_path(self, key: str) -> Path:
        *parents, name = key.split("/")
        return self._root.joinpath(META_DIR, *parents, f"{name}.json")

    # -- writes --------------------------------------------------------------------------------------

    def put(
        self,
        key: str,
        fileobj: Readable,
        *,
        content_type: str | None = None,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        path = self._path(key)
        expected = normalize_sha256(expected_sha256)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        self._make_parent(key, path)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as temp:
                digest = StreamDigest()
                for chunk in iter_chunks(fileobj):
                    digest.update(chunk)
                    temp.write(chunk)
                temp.flush()
                os.fsync(temp.fileno())
            digest.check(key, expected)
            if path.is_dir():
                raise StorageError(f"cannot store {key!r}: a directory of other blobs has that name")
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)
        info = path.stat()
        blob = StoredBlob(key, digest.size, digest.sha256, _mtime(info), content_type)
        self._write_meta(key, info, digest.sha256, content_type)
        logger.debug("stored %s in %s (%d bytes, sha256 %s)", key, self._root, blob.size, blob.sha256)
        return blob

    def _make_parent(self, key: str, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StorageError(f"cannot store {key!r}: a parent segment is already a blob") from exc

    def _write_meta(self, key: str, info: os.stat_result, sha256: str, content_type: str) -> None:
        record = {
            "sha256": sha256,
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "content_type": content_type,
        }
        meta = self._meta_path(key)
        try:
            meta.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=meta.parent, prefix=TEMP_PREFIX)
            with os.fdopen(fd, "w", encoding="utf-8") as temp:
                json.dump(record, temp)
            os.replace(temp_name, meta)
        except OSError:
            # The blob itself is safely stored; without its sidecar `stat` reports the hash as unknown.
            logger.warning("could not record metadata for %s in %s", key, self._root, exc_info=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            raise StorageError(f"cannot delete {key!r}: it is a directory of blobs, not a blob")
        path.unlink(missing_ok=True)
        self._meta_path(key).unlink(missing_ok=True)
        logger.debug("deleted %s from %s", key, self._root)

    # -- reads ---------------------------------------------------------------------------------------

    def open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            if path.is_dir():
                raise BlobNotFound(key)
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc

    def stat(self, key: str) -> StoredBlob | None:
        path = self._path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        sha256, content_type = self._read_meta(key, info)
        return StoredBlob(key, info.st_size, sha256, _mtime(info), content_type)

    def _read_meta(self, key: str, info: os.stat_result) -> tuple[str | None, str]:
        """The recorded sha256 (trusted only while size and mtime still match) and content type."""
        try:
            record = json.loads(self._meta_path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, DEFAULT_CONTENT_TYPE
        except (OSError, ValueError):
            logger.warning("unreadable metadata for %s in %s; hash treated as unknown", key, self._root)
            return None, DEFAULT_CONTENT_TYPE
        content_type = record.get("content_type") or DEFAULT_CONTENT_TYPE
        if record.get("size") != info.st_size or record.get("mtime_ns") != info.st_mtime_ns:
            logger.info("%s in %s changed outside the store; its sha256 is unknown", key, self._root)
            return None, content_type
        return record.get("sha256"), content_type

    def list(self, prefix: str = "") -> Iterator[StoredBlob]:
        validate_prefix(prefix)
        directory, _, _ = prefix.rpartition("/")
        start = self._root.joinpath(*directory.split("/")) if directory else self._root
        if not start.resolve().is_relative_to(self._root):
            raise InvalidKey(prefix, f"resolves outside the store root {str(self._root)!r}")
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [name for name in dirnames if not name.startswith(RESERVED_PREFIX)]
            relative = Path(dirpath).relative_to(self._root).as_posix()
            for name in filenames:
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix) and not name.startswith(RESERVED_PREFIX):
                    keys.append(key)
        for key in sorted(keys):
            blob = self._listed(key)
            if blob is not None:
                yield blob

    def _listed(self, key: str) -> StoredBlob | None:
        """`stat` for a key found on disk, skipping names no key can have and links leading out."""
        try:
            return self.stat(key)
        except InvalidKey as exc:
            logger.warning("skipping %s in %s: %s", key, self._root, exc.reason)
            return None

    def url(self, key: str, *, expires: int = 3600) -> str | None:
        """Always None: local blobs are served by the web app's authorised route, never by path."""
        self._path(key)
        return None


def _mtime(info: os.stat_result) -> datetime:
    return datetime.fromtimestamp(info.st_mtime, tz=UTC)
