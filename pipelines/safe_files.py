"""Reading model files without trusting them.

Model files come from strangers on the internet. Two rules follow:

* safetensors headers are validated completely (size cap, JSON shape, dtypes, offsets that tile the
  data section exactly) before any tensor is touched, so a hostile header cannot make us allocate or
  seek wildly, and a truncated download is named as such instead of failing deep inside a loader;
* pickles (`.ckpt`, `.pt`, `.bin`) are only ever opened with `torch.load(weights_only=True)`, whose
  unpickler refuses every callable that is not a tensor rebuild. There is no fallback to the full
  unpickler: a file that needs one is rejected with `UnsafeModelError`, and its code never runs.

The format is decided by the bytes, never by the file name. The name can only make us stricter: a
file called `.safetensors` that holds a pickle is refused, because whoever named it promised no code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pipelines.errors import ModelFormatError, UnsafeModelError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# safetensors' own reader refuses headers over 100 MB; real headers are < 1 MB (SDXL: ~250 KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES: Mapping[str, int] = MappingProxyType({
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
})
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class FileKind(StrEnum):
    """What the bytes of a model file are."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch_zip"  # torch.save since 1.6: a zip archive holding data.pkl + tensor blobs
    PICKLE = "pickle"  # legacy torch.save or a bare pickle stream
    DIFFUSERS = "diffusers"  # a folder with model_index.json / config.json


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensor layout and `__metadata__`, no tensor data read."""

    path: Path
    header_size: int
    file_size: int
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_offset(self) -> int:
        """Where tensor bytes start: after the 8-byte length and the JSON header."""
        return 8 + self.header_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def detect_kind(path: Path) -> FileKind:
    """Tell the container format from the first bytes (or a folder's config files)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return FileKind.DIFFUSERS
        raise ModelFormatError(f"{path} is a folder without model_index.json or config.json, not a diffusers model")
    if not path.is_file():
        raise ModelFormatError(f"{path} does not exist or is not a regular file")
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise ModelFormatError(f"{path.name} is truncated: only {len(head)} bytes")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return FileKind.TORCH_ZIP
    if head.startswith(_TORCH_LEGACY_MAGIC[:2]) or (head[0] == 0x80 and 2 <= head[1] <= 5):
        return FileKind.PICKLE
    (length,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and length >= 2:
        return FileKind.SAFETENSORS
    raise ModelFormatError(
        f"{path.name} is not a model file we can read (starts with {head[:8]!r}); expected safetensors or a "
        "PyTorch checkpoint"
    )


def _check_extension(path: Path, kind: FileKind) -> None:
    if path.suffix.lower() == ".safetensors" and kind is not FileKind.SAFETENSORS:
        what = "a PyTorch pickle (zip archive)" if kind is FileKind.TORCH_ZIP else "a pickle"
        raise ModelFormatError(
            f"{path.name} is named .safetensors but contains {what}; refusing to unpickle a file that claims to be "
            "safetensors — rename it to .ckpt if you trust it to be a checkpoint"
        )


def _parse_entry(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{path.name}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelFormatError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelFormatError(f"{path.name}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ModelFormatError(f"{path.name}: tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.start != info.numel * DTYPE_SIZES[dtype]:
        raise ModelFormatError(
            f"{path.name}: tensor {name!r} {dtype}{list(shape)} needs {info.numel * DTYPE_SIZES[dtype]} bytes but "
            f"its offsets span {info.end - info.start}"
        )
    return info


def read_safetensors_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and fully validate a safetensors header without reading tensor data.

    The data section must be tiled exactly by the tensors (no gaps, no overlaps, nothing missing
    at the end): that is what the format requires, and it is how truncated downloads show up.
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind is not FileKind.SAFETENSORS:
        _check_extension(path, kind)
        raise ModelFormatError(f"{path.name} is not a safetensors file (it is {kind.value})")
    file_size = path.stat().st_size
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > max_header_bytes:
            raise ModelFormatError(
                f"{path.name}: safetensors header of {length} bytes exceeds the {max_header_bytes}-byte limit"
            )
        if length > file_size - 8:
            raise ModelFormatError(
                f"{path.name} is truncated: header claims {length} bytes but the file has {file_size} bytes"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path.name}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path.name}: safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ModelFormatError(f"{path.name}: __metadata__ must map strings to strings")
    tensors = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    data_size = file_size - 8 - length
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            problem = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise ModelFormatError(f"{path.name}: tensor {name!r} at byte {info.start} {problem}")
        position = info.end
    if position > data_size:
        raise ModelFormatError(
            f"{path.name} is truncated: tensors need {position} data bytes but only {data_size} are present"
        )
    if position < data_size:
        raise ModelFormatError(f"{path.name}: {data_size - position} bytes after the last tensor are not described")
    return SafetensorsHeader(path, length, file_size, MappingProxyType(tensors), MappingProxyType(dict(metadata)))


def load_safetensors(path: Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Validate the header, then load all tensors (memory-mapped by safetensors)."""
    from safetensors.torch import load_file

    read_safetensors_header(path)
    return load_file(str(path), device=device)


class _Inert:
    """Stand-in for harmless training-state classes found in old checkpoints (e.g. Lightning's
    ModelCheckpoint callback state): it absorbs the pickled state and can do nothing else."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _allowed_globals() -> list[Any]:
    """Data-only globals old checkpoints need beyond torch's default weights_only set.

    numpy scalars/dtypes only rebuild numbers; the Lightning callback class is replaced by `_Inert`.
    Nothing here can call into the OS.
    """
    allowed: list[Any] = [
        (_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_Inert, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    ]
    try:
        import numpy as np
    except ImportError:
        return allowed
    core = getattr(np, "_core", None) or np.core
    allowed += [np.dtype, core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return allowed


def safe_globals():
    """Context manager extending torch's weights_only allowlist with `_allowed_globals()`."""
    import torch

    return torch.serialization.safe_globals(_allowed_globals())


def _check_legacy_stream(path: Path) -> None:
    """Walk the opcodes of a legacy torch file's pickles (magic, version, sys info, object, storage keys).

    The restricted unpickler reports a truncated stream as whatever it was reading when the bytes ran
    out — often a half-read global name — so truncation is detected here first and named as such.
    """
    import pickletools

    with path.open("rb") as f:
        for _ in range(5):
            if not f.peek(1)[:1]:
                return
            try:
                for _op in pickletools.genops(f):
                    pass
            except ValueError as exc:
                raise ModelFormatError(f"{path.name} is truncated or corrupt ({exc})") from None


def load_pickle(path: Path) -> Any:
    """Load a pickled checkpoint with the restricted unpickler only; never execute code from it."""
    import pickle

    import torch

    path = Path(path)
    kind = detect_kind(path)
    _check_extension(path, kind)
    if kind not in (FileKind.TORCH_ZIP, FileKind.PICKLE):
        raise ModelFormatError(f"{path.name} is {kind.value}, not a pickled checkpoint")
    if kind is FileKind.PICKLE:
        _check_legacy_stream(path)
    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind is FileKind.TORCH_ZIP)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "truncated" in message:
            raise ModelFormatError(f"{path.name} is truncated (pickle data ends early)") from None
        found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"global:? ([\w.]+)", message)
        what = f"would call {found.group(1)}" if found else "uses pickle instructions outside the safe subset"
        raise UnsafeModelError(
            f"{path.name} is a pickle that {what} when loaded; it was rejected without running it. Only tensors "
            "and plain containers are accepted — ask for a .safetensors version of this model"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as exc:
        raise ModelFormatError(f"{path.name} is not a readable PyTorch checkpoint: {exc}") from None


def unwrap_state_dict(obj: Any) -> Any:
    """Checkpoints nest weights under "state_dict" (Lightning) — sometimes twice."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def tensors_of(obj: Any, *, source: str = "file") -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping of a loaded checkpoint; non-tensor bookkeeping entries are dropped."""
    import torch

    obj = unwrap_state_dict(obj)
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{source} holds a {type(obj).__name__}, not a dictionary of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            out[key] = value
    if not out:
        raise ModelFormatError(f"{source} contains no tensors at its top level")
    return out


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single-file model, whatever its (safe) container."""
    path = Path(path)
    kind = detect_kind(path)
    if kind is FileKind.SAFETENSORS:
        return load_safetensors(path)
    if kind is FileKind.DIFFUSERS:
        raise ModelFormatError(f"{path} is a diffusers folder, not a single file")
    return tensors_of(load_pickle(path), source=path.name)


def convert_to_safetensors(
    src: Path, dst: Path, *, metadata: Mapping[str, str] | None = None,
    keep: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> Path:
    """Rewrite a pickled checkpoint as safetensors, atomically (temp file in dst's folder, then rename).

    Tensors that share storage (tied weights) are cloned, since safetensors stores each tensor once.
    Non-tensor entries (global_step, callbacks) are dropped, and so are tensors whose names `keep`
    (given all names) does not return.
    """
    import torch
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    tensors = load_state_dict(src)
    if keep is not None:
        kept = set(keep(list(tensors)))
        tensors = {k: v for k, v in tensors.items() if k in kept}
    seen: set[tuple[int, int]] = set()
    for key, value in tensors.items():
        if value.is_sparse or value.layout != torch.strided:
            raise ModelFormatError(f"{src.name}: tensor {key!r} is not a dense tensor")
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        value = value.contiguous()
        if ident in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        seen.add(ident)
        tensors[key] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("converted %s to %s (%d tensors)", src.name, dst, len(tensors))
    return dst
