"""The asset store shared by the control plane and the serving/training containers.

Configuration picks the store with one URL, and a registry maps the URL's scheme to a factory, so a
new backend plugs in with `register_store` without touching callers::

    store = open_store("/var/lib/studio/assets")           # LocalStore (a plain path or file:///...)
    store = open_store("s3://my-bucket/studio", region="eu-west-1")
    store = open_store("memory://")                         # MemoryStore, a fresh one per call
    blob = store.put_file("models/lora/style.safetensors", "/tmp/upload.bin")

The S3 store is imported on first use so that importing this package stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from deploy.storage.base import (
    BlobNotFound,
    BlobStore,
    ChecksumMismatch,
    InvalidKey,
    Readable,
    StorageError,
    StoredBlob,
    UnknownScheme,
    validate_key,
)
from deploy.storage.local import LocalStore
from deploy.storage.memory import MemoryStore

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "ChecksumMismatch",
    "InvalidKey",
    "LocalStore",
    "MemoryStore",
    "Readable",
    "StorageError",
    "StoreFactory",
    "StoredBlob",
    "UnknownScheme",
    "open_store",
    "register_store",
    "validate_key",
]

StoreFactory = Callable[..., BlobStore]
"""Called as ``factory(url, **options)`` with the full store URL and the caller's options."""

_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def _open_local(url: str, **options: Any) -> BlobStore:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URLs must name a local absolute path (file:///dir), got {url!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"file URLs must name an absolute path, got {url!r}")
    return LocalStore(Path(path), **options)


def _open_s3(url: str, **options: Any) -> BlobStore:
    from deploy.storage.s3 import S3Store

    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"S3 store URLs look like s3://bucket/prefix, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"S3 store URLs take options as arguments, not in the URL: {url!r}")
    return S3Store(parts.netloc, unquote(parts.path), **options)


def _open_memory(url: str, **options: Any) -> BlobStore:
    if url.rstrip("/") != "memory:":
        raise ValueError(f"the memory store URL is just 'memory://', got {url!r}")
    return MemoryStore(**options)


_REGISTRY: dict[str, StoreFactory] = {"file": _open_local, "s3": _open_s3, "memory": _open_memory}


def register_store(scheme: str, factory: StoreFactory, *, replace: bool = False) -> None:
    """Make `open_store` handle ``<scheme>://`` URLs; refusing silent replacement catches name clashes."""
    scheme = scheme.lower()
    if scheme in _REGISTRY and not replace:
        raise ValueError(f"a store is already registered for {scheme!r}://; pass replace=True to override")
    _REGISTRY[scheme] = factory


def open_store(url: str | Path, **options: Any) -> BlobStore:
    """Build the store a configuration URL names.

    ``file:///abs/dir`` or a plain path (relative paths resolve against the working directory) gives
    a `LocalStore`; ``s3://bucket/prefix`` an `S3Store` (options: `endpoint_url`, `region`, `client`,
    `part_size`, `spool_dir`, `list_page_size`); ``memory://`` a new `MemoryStore`.
    """
    if isinstance(url, Path):
        return LocalStore(url, **options)
    if not url or not url.strip():
        raise ValueError("store URL must not be empty")
    match = _URL_RE.match(url)
    if match is None:
        return LocalStore(Path(url), **options)
    scheme = match.group(1).lower()
    factory = _REGISTRY.get(scheme)
    if factory is None:
        known = ", ".join(f"{name}://" for name in sorted(_REGISTRY))
        raise UnknownScheme(f"no asset store for {scheme}:// in {url!r}; known: {known}, or a plain path")
    return factory(url, **options)
