"""Model files on the machine that runs a job: materialised from the asset store on demand, cached, evicted.

Engines load models from local paths, but the registry keeps bytes in the asset store (local disk or
S3) under content-addressed keys. A job message carries a small `ModelFileRef` per model; the worker
asks `ModelFiles.path_for(ref)` for a path:

* a model registered *in place* on this server returns its own `local_path` (nothing copied) once its
  bytes are shown to be the registered ones: size always, sha256 whenever the file's size or mtime is
  new to us (remembered in ``in-place-verified.json``, so a restart does not hash again). A file edited
  or replaced on disk is never loaded under the old identity: the job uses the asset-store copy when
  there is one and fails with a clear message otherwise;
* otherwise the blob is downloaded once into ``<cache_dir>/<sha[:2]>/<sha>.<format>``, verified
  against the ref's sha256 (a corrupt or swapped blob never reaches a loader), and reused later;
* when the cache grows past its disk budget, least-recently-used files go first — but never a file
  that is pinned (in use by a load) and never the file just fetched.

Several threads (and several worker processes sharing a cache dir) asking for the same file download
it once: a per-file thread lock plus an ``flock`` on a lock file serialise the download, and the
later callers find the finished file. The serving container imports this module, so it depends on
deploy.storage only — never on webapp.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.storage import BlobStore, ChecksumMismatch

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FORMAT = re.compile(r"[a-z0-9_]{1,16}")
LOCK_DIR = ".locks"
VERIFIED_FILE = "in-place-verified.json"


class ModelFileError(RuntimeError):
    """A model file could not be made available (missing blob, checksum mismatch, vanished local file)."""


@dataclass(frozen=True, slots=True)
class ModelFileRef:
    """What a job message says about one model file: enough to find and verify it anywhere.

    `local_path` is set for models registered in place on the control-plane server; a remote worker
    that cannot see that path falls back to `store_key` when there is one.
    """

    sha256: str
    store_key: str | None
    local_path: str | None
    size: int
    file_format: str = "safetensors"

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"ModelFileRef.sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        if self.store_key is None and self.local_path is None:
            raise ValueError("ModelFileRef needs a store_key or a local_path")
        if not _FORMAT.fullmatch(self.file_format or ""):
            raise ValueError(f"ModelFileRef.file_format {self.file_format!r} is not a short lower-case name")
        if self.size < 0:
            raise ValueError(f"ModelFileRef.size must be >= 0, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFileRef:
        return cls(
            sha256=data["sha256"], store_key=data.get("store_key"), local_path=data.get("local_path"),
            size=int(data.get("size", 0)), file_format=data.get("file_format") or "safetensors",
        )

    @property
    def suffix(self) -> str:
        """File extension engines expect: pickled hypernetworks stay ``.pt``, everything else safetensors."""
        return {"pickle": ".pt", "torch_zip": ".pt"}.get(self.file_format, f".{self.file_format}")


@dataclass
class _Entry:
    path: Path
    size: int
    last_used: float
    pins: int = 0


class ModelFiles:
    """A bounded local cache of model files in front of an asset store.

    `budget_bytes` bounds the cache directory (files in use may push it over until they are unpinned).
    The index is rebuilt from the directory at start, using file mtimes as last-use times, so a restart
    keeps what was cached.
    """

    def __init__(self, store: BlobStore, cache_dir: str | os.PathLike[str], budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.budget_bytes = int(budget_bytes)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / LOCK_DIR).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, _Entry] = {}
        self._clock = 0.0
        self._load_index()
        self._verified: dict[str, list[Any]] = self._load_verified()  # path -> [size, mtime_ns, sha256]

    # -- public API ------------------------------------------------------------------------------------

    def path_for(self, ref: ModelFileRef) -> Path:
        """A local path holding exactly the bytes of `ref`, fetching them if needed.

        The file is marked most recently used. Hold `pinned(ref)` around the load when eviction by a
        concurrent fetch must not remove it mid-read.
        """
        if ref.local_path is not None:
            local = Path(ref.local_path)
            if local.is_dir() or (local.is_file() and self._is_registered_bytes(local, ref)):
                return local
            if ref.store_key is None:
                if local.is_file():
                    raise ModelFileError(
                        f"model file {local} changed on disk since it was registered (sha256 {ref.sha256[:10]}); "
                        f"refresh the models folder to register the new file")
                raise ModelFileError(f"model file {local} (sha256 {ref.sha256[:10]}) is gone from this server")
        with self._lock:
            entry = self._entries.get(ref.sha256)
            if entry is not None and entry.path.is_file():
                self._touch(entry)
                return entry.path
        return self._fetch(ref)

    @contextlib.contextmanager
    def pinned(self, *refs: ModelFileRef) -> Iterator[list[Path]]:
        """Materialise `refs` and keep them from eviction until the block exits."""
        paths: list[Path] = []
        held: list[ModelFileRef] = []
        try:
            for ref in refs:
                self.pin(ref)
                held.append(ref)
                paths.append(self.path_for(ref))
            yield paths
        finally:
            for ref in held:
                self.unpin(ref)

    def pin(self, ref: ModelFileRef) -> None:
        """Protect `ref`'s cached file from eviction (counted: pin twice, unpin twice)."""
        with self._lock:
            entry = self._entries.get(ref.sha256)
            if entry is None:
                entry = self._entries[ref.sha256] = _Entry(self._cache_path(ref), 0, self._tick())
            entry.pins += 1

    def unpin(self, ref: ModelFileRef) -> None:
        with self._lock:
            entry = self._entries.get(ref.sha256)
            if entry is None or entry.pins == 0:
                raise ValueError(f"model file {ref.sha256[:10]} is not pinned")
            entry.pins -= 1
            if entry.pins == 0 and not entry.path.is_file():
                del self._entries[ref.sha256]  # pinned before it was fetched and never fetched
        self._evict(keep=None)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def is_cached(self, ref: ModelFileRef) -> bool:
        with self._lock:
            entry = self._entries.get(ref.sha256)
            return entry is not None and entry.size > 0 and entry.path.is_file()

    # -- internals -------------------------------------------------------------------------------------

    def _is_registered_bytes(self, local: Path, ref: ModelFileRef) -> bool:
        """True when `local` holds `ref`'s bytes (hashing only a size/mtime not seen before)."""
        stat = local.stat()
        if stat.st_size != ref.size:
            return False
        key, seen = str(local), [stat.st_size, stat.st_mtime_ns, ref.sha256]
        with self._lock:
            if self._verified.get(key) == seen:
                return True
        digest = hashlib.sha256()
        with local.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != ref.sha256:
            logger.warning("in-place model %s no longer has the registered sha256 %s", local, ref.sha256[:10])
            return False
        with self._lock:
            self._verified[key] = seen
            snapshot = dict(self._verified)
        self._save_verified(snapshot)
        return True

    def _load_verified(self) -> dict[str, list[Any]]:
        try:
            data = json.loads((self.cache_dir / VERIFIED_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3} if isinstance(data, dict) else {}

    def _save_verified(self, snapshot: Mapping[str, list[Any]]) -> None:
        target = self.cache_dir / VERIFIED_FILE
        temp = target.with_name(f".{VERIFIED_FILE}.{os.getpid()}.{threading.get_ident()}")
        try:
            temp.write_text(json.dumps(snapshot))
            os.replace(temp, target)
        except OSError:
            temp.unlink(missing_ok=True)
            logger.warning("could not record in-place verifications in %s", target)

    def _cache_path(self, ref: ModelFileRef) -> Path:
        return self.cache_dir / ref.sha256[:2] / f"{ref.sha256}{ref.suffix}"

    def _tick(self) -> float:
        self._clock += 1.0
        return self._clock

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = self._tick()
        with contextlib.suppress(OSError):
            os.utime(entry.path)  # survives restarts as the LRU order

    def _load_index(self) -> None:
        found: list[tuple[float, str, Path, int]] = []
        for path in self.cache_dir.glob("??/*"):
            sha = path.name.split(".", 1)[0]
            if path.name.startswith(".") or not _SHA256.fullmatch(sha) or not path.is_file():
                if path.name.startswith(".") and path.is_file():
                    path.unlink(missing_ok=True)  # a download interrupted by a crash
                continue
            stat = path.stat()
            found.append((stat.st_mtime, sha, path, stat.st_size))
        for _mtime, sha, path, size in sorted(found):
            self._entries[sha] = _Entry(path, size, self._tick())
        logger.debug("model cache %s: %d files, %d bytes", self.cache_dir, len(found), sum(f[3] for f in found))

    def _file_lock(self, sha256: str) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(sha256, threading.Lock())

    def _fetch(self, ref: ModelFileRef) -> Path:
        if ref.store_key is None:
            raise ModelFileError(f"model file {ref.sha256[:10]} has no copy in the asset store")
        target = self._cache_path(ref)
        with self._file_lock(ref.sha256), self._process_lock(ref.sha256):
            if not target.is_file():  # another thread or process may have fetched it meanwhile
                logger.info("fetching model %s (%d bytes) from the asset store", ref.store_key, ref.size)
                self._download(ref, target)
            size = target.stat().st_size
            with self._lock:
                entry = self._entries.get(ref.sha256)
                if entry is None:
                    entry = self._entries[ref.sha256] = _Entry(target, size, 0.0)
                entry.path, entry.size = target, size
                self._touch(entry)
        self._evict(keep=ref.sha256)
        return target

    def _download(self, ref: ModelFileRef, target: Path) -> None:
        """Download beside `target` and rename only after the sha256 matched the ref."""
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
        digest = hashlib.sha256()
        try:
            with self.store.open(ref.store_key) as source, temp.open("wb") as out:  # type: ignore[arg-type]
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != ref.sha256:
                raise ChecksumMismatch(ref.store_key or "", ref.sha256, digest.hexdigest(),
                                       outcome="the download was discarded")
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _process_lock(self, sha256: str) -> Iterator[None]:
        """Serialise downloads of one file across processes sharing the cache dir."""
        with (self.cache_dir / LOCK_DIR / f"{sha256}.lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _evict(self, keep: str | None) -> None:
        """Remove least-recently-used unpinned files until the cache fits its budget."""
        removed: list[Path] = []
        with self._lock:
            total = sum(e.size for e in self._entries.values())
            if total <= self.budget_bytes:
                return
            for sha, entry in sorted(self._entries.items(), key=lambda item: item[1].last_used):
                if total <= self.budget_bytes:
                    break
                if sha == keep or entry.pins > 0 or entry.size == 0:
                    continue
                del self._entries[sha]
                total -= entry.size
                removed.append(entry.path)
        for path in removed:
            path.unlink(missing_ok=True)
            logger.info("model cache: evicted %s to stay within %d bytes", path.name, self.budget_bytes)
        if total > self.budget_bytes:
            logger.warning("model cache holds %d bytes, over its %d-byte budget: the rest is in use",
                           total, self.budget_bytes)
