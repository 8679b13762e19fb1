"""Sources for store tests: content generated on the fly, so a 50 MB upload never exists as one bytes
object in the test either, and sources that fail part-way like a dropped browser upload."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

BLOCK = 64 * 1024


class SourceFailure(OSError):
    """Raised by a `GeneratedStream` told to fail, standing in for a connection reset mid-upload."""


def generated_blocks(size: int, seed: int = 0) -> Iterator[bytes]:
    """Deterministic content in 64 KiB blocks that differ from each other, so a store that reorders,
    drops or repeats a chunk produces a different hash."""
    produced = 0
    index = 0
    while produced < size:
        pattern = hashlib.sha256(f"{seed}:{index}".encode()).digest()
        block = (pattern * (BLOCK // len(pattern)))[: size - produced]
        produced += len(block)
        index += 1
        yield block


def generated_sha256(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for block in generated_blocks(size, seed):
        digest.update(block)
    return digest.hexdigest()


def generated_bytes(size: int, seed: int = 0) -> bytes:
    """The same content as one bytes object, for small comparisons only."""
    return b"".join(generated_blocks(size, seed))


class GeneratedStream(io.RawIOBase):
    """A non-seekable binary stream over `generated_blocks`; raises `SourceFailure` once `fail_after`
    bytes have been read."""

    def __init__(self, size: int, *, seed: int = 0, fail_after: int | None = None) -> None:
        super().__init__()
        self._blocks = generated_blocks(size, seed)
        self._pending = memoryview(b"")
        self._position = 0
        self._fail_after = fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._fail_after is not None and self._position >= self._fail_after:
            raise SourceFailure(f"source failed after {self._position} bytes")
        if not self._pending:
            self._pending = memoryview(next(self._blocks, b""))
        count = min(len(buffer), len(self._pending))
        if self._fail_after is not None:
            count = min(count, self._fail_after - self._position)
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        self._position += count
        return count


class ShiftingFile(io.BytesIO):
    """A seekable source whose bytes change after the first pass, like a file being rewritten while
    it is uploaded."""

    def __init__(self, first: bytes, second: bytes) -> None:
        if len(first) != len(second):
            raise ValueError("both versions must have the same length")
        super().__init__(first)
        self._second = second
        self._swapped = False

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self._swapped and self.tell() > 0:
            self._swapped = True
            with self.getbuffer() as view:
                view[:] = self._second
        return super().seek(offset, whence)
