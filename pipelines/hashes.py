"""A1111-compatible model hashes (a1111-api.md §8), computed by streaming.

Infotexts and API clients identify models by these short hashes, so they must equal A1111's bit for
bit: AutoV2 (first 10 hex of the file's sha256), legacy AutoV1 (8 hex of the 64 KiB at 1 MiB), LoRA
AutoV3 (12 hex of the sha256 of the safetensors *data* section, which survives metadata edits) and the
textual-inversion hash (12 hex of the file's sha256). Files are read in chunks — never whole — and
`hash_file` produces all of them in a single pass over a multi-GB file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

Progress = Callable[[int, int], None]  # (bytes done, total bytes)


@dataclass(frozen=True)
class FileHashes:
    """Every hash A1111 shows for a model file."""

    sha256: str  # whole file
    legacy: str  # AutoV1: sha256 of 0x10000 bytes at 0x100000, first 8 hex
    data_sha256: str | None  # safetensors only: sha256 of the bytes after the header
    metadata_hash: str | None = None  # a valid `sshs_model_hash` from the header, lowercased

    @property
    def autov2(self) -> str:
        """Checkpoint hash shown in infotexts (`Model hash: ...`)."""
        return self.sha256[:10]

    @property
    def lora_sha256(self) -> str:
        """What A1111 records as a LoRA's sha256: sshs_model_hash if present, else the data hash."""
        return self.metadata_hash or self.data_sha256 or self.sha256

    @property
    def autov3(self) -> str:
        """LoRA hash shown in infotexts (`Lora hashes: "name: ..."`)."""
        return self.lora_sha256[:12]

    @property
    def textual_inversion(self) -> str:
        """Embedding hash shown in infotexts (`TI hashes: ...`)."""
        return self.sha256[:12]


def _safetensors_data_offset(path: Path) -> int | None:
    """Start of the tensor data if the file is safetensors-shaped, else None."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    return 8 + length if 8 + length <= path.stat().st_size else None


def _metadata_hash(path: Path) -> str | None:
    """`sshs_model_hash` if it is a well-formed sha256; A1111 trusts it blindly, we check the shape."""
    from pipelines.errors import ModelFormatError
    from pipelines.safe_files import read_safetensors_header

    try:
        value = read_safetensors_header(path).metadata.get("sshs_model_hash")
    except ModelFormatError:
        return None
    if value is None:
        return None
    if not _HEX64.fullmatch(value):
        logger.warning("%s: ignoring malformed sshs_model_hash %r", path.name, value[:80])
        return None
    return value.lower()


def hash_file(path: Path | str, *, chunk_bytes: int = CHUNK_BYTES, progress: Progress | None = None) -> FileHashes:
    """All A1111 hashes of `path` in one streaming pass (memory: one chunk)."""
    path = Path(path)
    total = path.stat().st_size
    data_offset = _safetensors_data_offset(path)
    whole, data, legacy = hashlib.sha256(), hashlib.sha256() if data_offset is not None else None, hashlib.sha256()
    position = 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            whole.update(chunk)
            end = position + len(chunk)
            if data is not None and end > data_offset:
                data.update(chunk[max(0, data_offset - position):])
            lo, hi = max(position, LEGACY_OFFSET), min(end, LEGACY_OFFSET + LEGACY_LENGTH)
            if lo < hi:
                legacy.update(chunk[lo - position:hi - position])
            position = end
            if progress is not None:
                progress(position, total)
    return FileHashes(
        sha256=whole.hexdigest(), legacy=legacy.hexdigest()[:8],
        data_sha256=data.hexdigest() if data is not None else None,
        metadata_hash=_metadata_hash(path) if data_offset is not None else None,
    )


def sha256_file(path: Path | str, *, chunk_bytes: int = CHUNK_BYTES, progress: Progress | None = None) -> str:
    """Streaming sha256 of the whole file."""
    digest = hashlib.sha256()
    path = Path(path)
    total, done = path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def autov2(path: Path | str) -> str:
    """Checkpoint AutoV2: first 10 hex of the file's sha256."""
    return sha256_file(path)[:10]


def legacy_hash(path: Path | str) -> str:
    """Checkpoint AutoV1 ("model hash" of old infotexts): 8 hex of sha256(64 KiB at 1 MiB)."""
    with Path(path).open("rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]


def lora_hash(path: Path | str) -> str:
    """LoRA AutoV3 (12 hex): sshs_model_hash, else sha256 after the safetensors header, else whole file."""
    path = Path(path)
    metadata = _metadata_hash(path) if _safetensors_data_offset(path) is not None else None
    if metadata:
        return metadata[:12]
    offset = _safetensors_data_offset(path)
    if offset is None:
        return sha256_file(path)[:12]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def textual_inversion_hash(path: Path | str) -> str:
    """Embedding hash (12 hex of the file's sha256)."""
    return sha256_file(path)[:12]
